"""The on-disk cache of converted GGUF checkpoints: a second load reads the cache and gives the same model
and tokenizer; the cache can be turned off; a damaged entry is not used."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from chunkattn.model import default_model_path, load_model, load_tokenizer, weight_cache


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("chunkattn-cache")


def _entry_in(cache_dir, monkeypatch):
    """The default model's entry name in ``cache_dir``, written there first if an earlier test did not."""
    monkeypatch.setenv("CHUNKATTN_CACHE_DIR", str(cache_dir))
    monkeypatch.delenv("CHUNKATTN_WEIGHT_CACHE", raising=False)
    if weight_cache.lookup(default_model_path()) is None:
        load_model()
    entry = weight_cache.lookup(default_model_path())
    assert entry is not None
    return entry.name


def test_second_load_reads_the_cache_and_equals_the_first(cache_dir, monkeypatch, caplog):
    monkeypatch.setenv("CHUNKATTN_CACHE_DIR", str(cache_dir))
    monkeypatch.delenv("CHUNKATTN_WEIGHT_CACHE", raising=False)
    gguf = default_model_path()
    caplog.set_level(logging.INFO, logger="chunkattn.load")
    first = load_model()
    entry = weight_cache.lookup(gguf)
    assert entry is not None and (entry / "model.safetensors").exists() and "converting" in caplog.text
    caplog.clear()
    second = load_model()
    assert "from the weight cache" in caplog.text and "converting" not in caplog.text
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first.config == second.config and first.source == second.source == str(gguf)
    tok1, tok2 = first.tokenizer, second.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo, wörld! 1234 <tag>"}]
    assert tok1.apply_chat_template(messages, tokenize=False) == tok2.apply_chat_template(messages, tokenize=False)
    text = "The quick brown fox — jumps over 13 lazy dogs.\n\tdef f(x): return x**2"
    assert tok1(text)["input_ids"] == tok2(text)["input_ids"]
    assert (tok1.eos_token_id, tok1.bos_token_id) == (tok2.eos_token_id, tok2.bos_token_id)
    # the tokenizer alone (e.g. serve --tokenizer) comes from the same entry
    assert load_tokenizer(gguf)(text)["input_ids"] == tok1(text)["input_ids"]
    # read without the entry's config.json (AutoTokenizer given a config): the same object as AutoTokenizer's reading
    # of the whole entry, attribute for attribute
    _assert_same_tokenizer(tok2, AutoTokenizer.from_pretrained(str(entry), local_files_only=True))


def _assert_same_tokenizer(a, b) -> None:
    text = "The quick brown fox — jumps over 13 lazy dogs.\n\tdef f(x): return x**2 <|im_start|>"
    assert type(a) is type(b) and a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    state = [{k: repr(v) for k, v in vars(t).items() if k != "_tokenizer"} for t in (a, b)]
    assert state[0] == state[1] and a(text)["input_ids"] == b(text)["input_ids"]


def test_a_cached_tokenizer_is_the_one_autotokenizer_reads(cache_dir, tmp_path, monkeypatch):
    """Whatever class a cached entry's tokenizer_config.json names (also one AutoTokenizer overrides: a byte-level
    tokenizer.json under a sentencepiece class's name), or none, the start-up's reading gives AutoTokenizer's
    tokenizer of the whole entry."""
    import json

    from chunkattn.model.loader import _cached_tokenizer

    entry = cache_dir / "gguf" / _entry_in(cache_dir, monkeypatch)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (entry / f).exists():
            shutil.copy(entry / f, tmp_path / f)
    base = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for name in (base.get("tokenizer_class"), "LlamaTokenizer", "GPT2Tokenizer", "PreTrainedTokenizerFast", None):
        cfg = {k: v for k, v in base.items() if k != "tokenizer_class"} | ({"tokenizer_class": name} if name else {})
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
        _assert_same_tokenizer(_cached_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path),
                                                                                           local_files_only=True))


def test_incomplete_entry_is_ignored_and_cache_can_be_off(cache_dir, tmp_path, monkeypatch):
    gguf = default_model_path()
    name = _entry_in(cache_dir, monkeypatch)
    monkeypatch.setenv("CHUNKATTN_CACHE_DIR", str(tmp_path))
    entry = weight_cache.entry_dir(gguf)
    assert entry is not None and entry.name == name
    shutil.copytree(cache_dir / "gguf" / name, entry)  # (the first test's entry, same key)
    assert weight_cache.lookup(gguf) == entry
    (entry / "complete").unlink()  # as if a writer died before finishing
    assert weight_cache.lookup(gguf) is None
    monkeypatch.setenv("CHUNKATTN_WEIGHT_CACHE", "0")
    assert weight_cache.cache_root() is None and weight_cache.lookup(gguf) is None
    assert weight_cache.store(gguf, {}, {}, None) is None


def test_digest_is_of_the_content_and_memoized(tmp_path, monkeypatch):
    monkeypatch.setenv("CHUNKATTN_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"abc" * 1000)
    root = weight_cache.cache_root()
    import hashlib

    assert weight_cache.file_digest(f, root) == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert (tmp_path / "cache" / "gguf" / "index.json").exists()
    f.write_bytes(b"abde" * 1000)  # changed content (and size, so the memo's key): a new digest
    assert weight_cache.file_digest(f, root) == hashlib.sha256(b"abde" * 1000).hexdigest()


@pytest.mark.parametrize("damage", ["truncated", "header length"])
def test_a_damaged_entry_is_converted_again(cache_dir, tmp_path, monkeypatch, caplog, damage):
    """A truncated model.safetensors beside its "complete" mark (a crash of the disk, not of the writer), or one
    whose header length is garbage (it was read as a 2^62-byte allocation, a MemoryError the loader took for the
    model's): the load warns, converts again, rewrites the entry and gives the same model."""
    gguf = default_model_path()
    name = _entry_in(cache_dir, monkeypatch)
    monkeypatch.setenv("CHUNKATTN_CACHE_DIR", str(tmp_path))
    entry = weight_cache.entry_dir(gguf)
    assert entry is not None and entry.name == name
    shutil.copytree(cache_dir / "gguf" / name, entry)
    weights = entry / "model.safetensors"
    full = weights.stat().st_size
    with open(weights, "r+b") as f:
        if damage == "truncated":
            f.truncate(full // 2)
        else:
            f.write((1 << 62).to_bytes(8, "little"))
    caplog.set_level(logging.INFO, logger="chunkattn.load")
    loaded = load_model()
    assert "unreadable" in caplog.text and "converting" in caplog.text
    assert weight_cache.lookup(gguf) == entry and (entry / "model.safetensors").stat().st_size == full
    monkeypatch.setenv("CHUNKATTN_CACHE_DIR", str(cache_dir))
    reference = load_model().model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.model.state_dict().items())


@pytest.mark.skipif(not __import__("chunkattn.model.quant", fromlist=["kernel_supported"]).kernel_supported(),
                    reason="blocks are kept (and cached) only where the quantized kernel runs: AVX512-BF16")
def test_quantized_load_caches_its_blocks(tmp_path, monkeypatch, caplog):
    """A bfloat16 load keeps the file's blocks; the first writes them to ``<entry>-blocks-v<BLOCKS_FORMAT>``, the
    second reads them from there (not the GGUF file) and packs the same weights; a damaged entry is read from the
    file again, and writing it drops an earlier format's entry."""
    monkeypatch.setenv("CHUNKATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CHUNKATTN_WEIGHT_CACHE", raising=False)
    caplog.set_level(logging.INFO, logger="chunkattn.load")
    first = load_model(dtype=torch.bfloat16)
    assert "cached the blocks" in caplog.text
    caplog.clear()
    second = load_model(dtype=torch.bfloat16)
    assert "blocks from the weight cache" in caplog.text
    for (name, a), b in zip(first.model.named_modules(), second.model.modules()):
        if getattr(a, "quant", None) is not None:
            assert a.quant.qtype == b.quant.qtype and torch.equal(a.quant.packed, b.quant.packed), name
    assert torch.equal(first.model.model.norm.weight, second.model.model.norm.weight)
    entry = weight_cache.entry_dir(default_model_path())
    blocks_dir = entry.parent / f"{entry.name}-blocks-v{weight_cache.BLOCKS_FORMAT}"
    (blocks_dir / "weights.safetensors").write_bytes(b"not safetensors")
    earlier = entry.parent / f"{entry.name}-blocks-v1"  # earlier formats' entries, no longer read
    (earlier / "sub").mkdir(parents=True)
    earlier_q4 = entry.parent / f"{entry.name}-blocks-q4_0-v{weight_cache.BLOCKS_FORMAT - 1}"
    earlier_q4.mkdir()
    current_q4 = entry.parent / f"{entry.name}-blocks-q4_0-v{weight_cache.BLOCKS_FORMAT}"  # (another variant's)
    current_q4.mkdir()
    caplog.clear()
    third = load_model(dtype=torch.bfloat16)
    assert "unreadable" in caplog.text and "cached the blocks" in caplog.text
    assert torch.equal(third.model.lm_head.quant.packed, first.model.lm_head.quant.packed)
    # (written anew: the old formats' entries dropped, of every variant; the current ones kept)
    assert not earlier.exists() and not earlier_q4.exists() and blocks_dir.exists() and current_q4.exists()


def test_safetensors_key_groups_cover_the_file_in_order_within_the_limit(tmp_path):
    """A reader maps a file a group of tensors at a time: every tensor in exactly one group, in file order, no
    group holding more data than the limit (the largest tensor's by default) unless it is one larger tensor; and the
    tensors read a group at a time equal safetensors' own reading."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(3)
    sizes = [5, 700, 3, 3, 1000, 64, 64, 64, 1, 999, 2]  # float32 elements
    tensors = {f"t{i:02d}": torch.randn(n, generator=gen) for i, n in enumerate(sizes)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    with safe_open(str(path), framework="pt") as f:
        want = {k: f.get_tensor(k) for k in f.keys()}
    for limit, bound in ((None, 4000), (300, 300), (1, 1)):
        groups = weight_cache.safetensors_key_groups(path, limit)
        flat = [k for g in groups for k in g]
        assert sorted(flat) == sorted(tensors) and len(flat) == len(set(flat))
        assert all(g for g in groups)
        for g in groups:
            data = sum(tensors[k].numel() * 4 for k in g)
            assert data <= bound or len(g) == 1, (limit, g)
        if limit == 1:
            assert len(groups) == len(tensors)
        got = {}
        for g in groups:
            with safe_open(str(path), framework="pt") as f:
                got.update({k: f.get_tensor(k).clone() for k in g})
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert len(weight_cache.safetensors_key_groups(path)) < len(tensors)  # (grouped at the default limit)
    save_file({}, str(tmp_path / "empty.safetensors"))
    assert weight_cache.safetensors_key_groups(tmp_path / "empty.safetensors") == []


def test_safetensors_key_groups_cap_the_bytes_mapped_and_refuse_what_is_no_safetensors(tmp_path, monkeypatch):
    """The default limit is MAP_BYTES where the largest tensor is larger (a large embedding first must not make
    every later group as large: their pages would add to a load's peak); a header length the file cannot hold (a
    Git LFS pointer, a damaged file) is a ValueError, not an attempt to read 2^60 bytes."""
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a_embed": torch.zeros(4000), **{f"b{i}": torch.zeros(100) for i in range(20)}}, str(path))
    monkeypatch.setattr(weight_cache, "MAP_BYTES", 1000)  # bytes: 2.5 of the small tensors
    groups = weight_cache.safetensors_key_groups(path)
    assert groups[0] == ["a_embed"] and all(len(g) <= 2 for g in groups[1:]) and len(groups) == 11
    monkeypatch.setattr(weight_cache, "MAP_BYTES", 1 << 20)  # above the largest: the largest's 16000 bytes
    assert [len(g) for g in weight_cache.safetensors_key_groups(path)] == [1, 20]
    bad = tmp_path / "bad.safetensors"
    for data in ((1 << 62).to_bytes(8, "little") + b"{}", b"version https://git-lfs.github.com/spec/v1\n", b"12"):
        bad.write_bytes(data)
        with pytest.raises(ValueError, match="not a safetensors file"):
            weight_cache.safetensors_key_groups(bad)


def test_an_embedding_is_initialized_except_on_the_meta_device():
    """Embedding skips torch's normal_ init only on the meta device (where models are built before their weights
    are assigned): elsewhere it starts from N(0, 1) as nn.Embedding does."""
    from chunkattn.model.layers import Embedding

    torch.manual_seed(0)
    w = Embedding(1000, 16).weight.detach()
    assert 0.9 < float(w.std()) < 1.1 and abs(float(w.mean())) < 0.05
    with torch.device("meta"):
        m = Embedding(1000, 16)
    assert m.weight.is_meta and m.weight.shape == (1000, 16)
