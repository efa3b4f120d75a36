"""Incremental detokenization (multi-byte text, both code paths) and stop strings held back while they may
still match."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkattn.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer, StopStrings
from chunkattn.model import default_model_path

TEXTS = [
    "Héllo wörld, naïve café! 日本語のテキスト 🎉🚀 emoji and Ελληνικά, done.",
    "混合 text with 中文, العربية and 한국어 — plus “quotes” and ümlauts.",
    "👩‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 1️⃣ keycap: combined emoji sequences.",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    path = default_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


class SlowView:
    """The same tokenizer seen as a slow one (no Rust backend): exercises the windowed decode path."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def decode(self, ids, skip_special_tokens=True):
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("slow", [False, True])
@pytest.mark.parametrize("text", TEXTS)
def test_incremental_text_equals_full_decode_and_never_shows_a_broken_character(tokenizer, text, slow):
    prompt = tokenizer("Say something:", add_special_tokens=False)["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any(len(tokenizer.decode([i])) and REPLACEMENT in tokenizer.decode([i]) for i in ids), \
        "the text must split a character across tokens for this test to mean something"
    detok = IncrementalDetokenizer(SlowView(tokenizer) if slow else tokenizer, prompt)
    assert (detok._stream is None) == slow
    out = ""
    for i, t in enumerate(ids):
        piece = detok.push(t)
        assert REPLACEMENT not in piece
        out += piece
        assert tokenizer.decode(ids[: i + 1]).startswith(out)  # never ahead of the truth
    assert out == tokenizer.decode(ids)


@pytest.mark.parametrize("slow", [False, True])
def test_a_prompt_ending_inside_a_character_never_leaks_into_the_output(tokenizer, slow):
    """The prompt's last tokens hold part of a character (byte-level tokens): the output's text is only
    what the output tokens decode to, never the prompt's words before them (it was with the fast stream)."""
    # " salty consumedImage overseas vill" and a lone lead byte: the tail of a random-token prompt of the serve
    # benchmark, whose first output came back as 'Image overseas vill \ufffd{"city": ...'
    prompt = [28214, 9495, 9268, 17036, 4407, 18811]
    assert tokenizer.decode(prompt).endswith(REPLACEMENT)
    detok = IncrementalDetokenizer(SlowView(tokenizer) if slow else tokenizer, prompt)
    out = "".join(detok.push(t) for t in tokenizer('{"city":"Ci"}', add_special_tokens=False)["input_ids"])
    assert out == '{"city":"Ci"}', repr(out)


def test_special_tokens_are_skipped_or_kept(tokenizer):
    eos = tokenizer.eos_token_id
    ids = tokenizer("Hi there", add_special_tokens=False)["input_ids"] + [eos]
    skip = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    keep = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    assert "".join(skip.push(t) for t in ids) == "Hi there"
    assert "".join(keep.push(t) for t in ids) == "Hi there" + tokenizer.eos_token


def release_stream(stops: list[str], pieces: list[str]) -> tuple[str, str | None, list[str]]:
    """Feed pieces like the engine: returns (final text, stop found, what was released at each step)."""
    checker = StopStrings(stops)
    text, released, shown = "", 0, []
    for piece in pieces:
        text += piece
        at, stop, releasable = checker.check(text, len(piece))
        if at is not None:
            text = text[:at]
            shown.append(text[released:])
            return text, stop, shown
        shown.append(text[released:releasable])
        released = releasable
    shown.append(text[released:])
    return text, None, shown


@pytest.mark.parametrize("seed", range(20))
def test_stop_strings_are_found_across_pieces_and_never_leak(seed):
    rng = random.Random(seed)
    stops = ["STOP", "</answer>", "ab"]
    body = "".join(rng.choice(["x", "y", "S", "ST", "STO", "</", "a", " "]) for _ in range(30))
    stop = rng.choice(stops)
    full = body + stop + "tail"
    cuts = sorted(rng.sample(range(1, len(full)), 8))
    pieces = [full[a:b] for a, b in zip([0, *cuts], [*cuts, len(full)])]
    first = min((full.find(s), s) for s in stops if s in full)
    text, found, shown = release_stream(stops, pieces)
    assert (text, found) == (full[: first[0]], first[1])
    assert "".join(shown) == text  # everything released exactly once, nothing of the stop string
    for s in stops:
        assert s not in "".join(shown)


def test_a_partial_stop_string_is_held_back_then_released():
    checker = StopStrings(["</answer>"])
    assert checker.check("the answer </ans", 6) == (None, None, len("the answer "))
    assert checker.check("the answer </anx", 1) == (None, None, len("the answer </anx"))
    assert StopStrings([]).check("abc", 3) == (None, None, 3)


# any text but U+FFFD itself (the detokenizer's sign of a broken character) and surrogates (not encodable)
_ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=REPLACEMENT), max_size=60)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=_ANY_TEXT, text=_ANY_TEXT, raw=st.lists(st.integers(0, 49151), max_size=12), slow=st.booleans(),
       special=st.sampled_from([None, 0, -1]), skip=st.booleans())
def test_any_tokens_come_out_piece_by_piece_as_the_full_decode(tokenizer, prompt, text, raw, slow, special, skip):
    """Property-based, both code paths: the tokens of any Unicode text (combining marks, emoji sequences,
    controls, characters the vocabulary spells as bytes) then any token ids a model might sample (bytes that form
    no character), after any prompt, with a special token at the start or end or none, kept or skipped. The
    pieces never run ahead of the full decode of the tokens so far; a U+FFFD appears only where that decode has
    one (bytes that can no longer form a character); at the end the pieces are the full decode, less only a tail
    that holds an incomplete character."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + raw
    if special is not None:
        ids.insert(len(ids) if special == -1 else 0, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    detok = IncrementalDetokenizer(SlowView(tokenizer) if slow else tokenizer, prompt_ids, skip)
    out = ""
    for i, t in enumerate(ids):
        out += detok.push(t)
        assert tokenizer.decode(ids[: i + 1], skip_special_tokens=skip).startswith(out)  # never ahead of the truth
    full = tokenizer.decode(ids, skip_special_tokens=skip)
    assert full.startswith(out) and (out == full or REPLACEMENT in full[len(out) :]), (out, full)
