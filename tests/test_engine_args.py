"""``EngineArgs``: one spelling of the engine options. Every field has a flag that round-trips, bad values name
the field, each command keeps its defaults, and ``LLM(...)`` keywords build the same engine as
``LLM.from_args``."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import pickle

import pytest
import torch

from chunkattn import LLM, EngineArgs
from chunkattn.bench.serve import ServeConfig
from chunkattn.cli import build_parser
from chunkattn.engine.args import CLI_OPTIONS, MODEL_OPTIONS, SERVING_KV_CACHE_TOKENS
from helpers import tiny_model
from server_helpers import TINY_CONFIG

FIELDS = [f.name for f in dataclasses.fields(EngineArgs)]

# a value other than the default for every field, as EngineArgs holds it and as the command line spells it
OTHER = EngineArgs("some/model.gguf", tokenizer="some/tokenizer", chat_template="{{ messages[0]['content'] }}",
                   device="cuda:1", dtype="bfloat16",
                   random_weights=True, quantization="q8_0", kv_cache_tokens=1000, chunk_size=16,
                   max_num_batched_tokens=128, max_num_seqs=7, scheduling_policy="fcfs", max_overtakes=3,
                   backend="reference",
                   prefix_sharing=False, eviction="longest-first")


def _argv(args: EngineArgs) -> list[str]:
    argv: list[str] = []
    for name in FIELDS:
        flag, options = CLI_OPTIONS[name]
        value = getattr(args, name)
        if options.get("action") == "store_true":
            argv += [flag] if value else []
        elif options.get("action") == "store_false":
            argv += [] if value else [flag]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def test_every_field_has_a_flag_that_round_trips():
    assert set(CLI_OPTIONS) == set(FIELDS)
    assert set(MODEL_OPTIONS) < set(FIELDS)
    default = EngineArgs()
    assert all(getattr(OTHER, n) != getattr(default, n) for n in FIELDS), "OTHER must change every field"
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    assert EngineArgs.from_cli_args(parser.parse_args(_argv(OTHER))) == OTHER
    assert EngineArgs.from_cli_args(parser.parse_args([])) == default


def test_per_command_defaults_also_for_fields_without_a_flag():
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser(), defaults={"kv_cache_tokens": 4096, "chunk_size": 8},
                                     include=MODEL_OPTIONS)
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-tokens", "10"])  # not a flag of this parser
    got = EngineArgs.from_cli_args(parser.parse_args(["--dtype", "bfloat16"]))
    assert got == EngineArgs(dtype="bfloat16", kv_cache_tokens=4096, chunk_size=8)
    with pytest.raises(ValueError, match="no field 'kv_tokens'"):
        EngineArgs.add_cli_args(argparse.ArgumentParser(), defaults={"kv_tokens": 1})


@pytest.mark.parametrize(("argv", "expected"), [
    (["generate", "hi"], EngineArgs()),
    (["demo"], EngineArgs(kv_cache_tokens=SERVING_KV_CACHE_TOKENS)),
    (["serve"], EngineArgs(kv_cache_tokens=SERVING_KV_CACHE_TOKENS)),
    (["bench", "serve"], EngineArgs(kv_cache_tokens=SERVING_KV_CACHE_TOKENS)),
    (["serve", "--kv-cache-tokens", "8192", "--chunk-size", "16", "--max-num-batched-tokens", "64",
      "--max-num-seqs", "4", "--backend", "auto", "--no-prefix-sharing", "--tokenizer", "t", "--random-weights",
      "--dtype", "bfloat16", "--quantization", "none", "--device", "cpu", "--model", "m", "--eviction", "lru"],
     EngineArgs("m", tokenizer="t", dtype="bfloat16", random_weights=True, quantization="none",
                kv_cache_tokens=8192, chunk_size=16, max_num_batched_tokens=64, max_num_seqs=4, prefix_sharing=False)),
    (["bench", "serve", "--kv-cache-tokens", "4096", "--chunk-size", "8", "--max-num-batched-tokens", "32",
      "--no-prefix-sharing"],  # (bench serve's own flag: only the no-sharing system)
     EngineArgs(kv_cache_tokens=4096, chunk_size=8, max_num_batched_tokens=32)),
])
def test_each_command_keeps_its_flags_and_defaults(argv, expected):
    assert EngineArgs.from_cli_args(build_parser().parse_args(argv)) == expected


def test_the_cli_reports_a_bad_value_by_its_field(capsys):
    from chunkattn.cli import main

    assert main(["serve", "--kv-cache-tokens", "0"]) == 2
    assert "kv_cache_tokens must be a positive int, got 0" in capsys.readouterr().err


def test_a_pool_larger_than_the_memory_available_fails_at_once_with_its_size(tmp_path, capsys):
    """``serve`` with a pool of 2**42 tokens (1 PiB here) exits 2 with the pool's size and how many tokens fit,
    before allocating anything (not a kill by the OOM killer, nor the allocator's "can't allocate memory")."""
    from chunkattn.cli import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "max_position_embeddings": 512, "tie_word_embeddings": True}))
    assert main(["serve", "--model", str(config), "--random-weights", "--kv-cache-tokens", str(2**42),
                 "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert f"a K/V pool of {2**42} tokens needs 1048576.0 GiB (256 bytes a token: 2 layers x 2 K/V heads" in err
    assert "lower the pool's size (kv_cache_tokens, --kv-cache-tokens) to at most" in err


@pytest.mark.parametrize(("changes", "match"), [
    ({"kv_cache_tokens": 0}, "kv_cache_tokens must be a positive int, got 0"),
    ({"chunk_size": -1}, "chunk_size must be a positive int"),
    ({"max_num_batched_tokens": 1.5}, "max_num_batched_tokens must be a positive int"),
    ({"max_num_seqs": True}, "max_num_seqs must be a positive int"),
    ({"dtype": "float8"}, "dtype must be a torch.dtype or one of auto, float32, bfloat16, float16; got 'float8'"),
    ({"device": "tpu"}, "device must be 'cpu', 'cuda'"),
    ({"quantization": "q2_k"}, "unknown quantization 'q2_k'; choose one of auto, none, gguf"),
    ({"backend": "fast"}, "backend must be one of .*'auto'.*got 'fast'"),
    ({"scheduling_policy": "lpm"}, r"scheduling_policy must be one of \['cache-aware', 'fcfs'\], got 'lpm'"),
    ({"max_overtakes": -1}, "max_overtakes must be an int >= 0, got -1"),
    ({"max_overtakes": 2.0}, "max_overtakes must be an int >= 0, got 2.0"),
    ({"eviction": "fifo"}, r"eviction policy must be one of \['longest-first', 'lru'\]"),
    ({"prefix_sharing": "no"}, "prefix_sharing must be True or False"),
    ({"random_weights": None}, "random_weights must be True or False"),
    ({"model": 3}, "model must be a path"),
    ({"chat_template": "no/such/template.jinja"}, "neither a file nor a Jinja template"),
    ({"chat_template": "{% if %}x"}, "chat_template: the template does not parse"),
])
def test_bad_values_raise_naming_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        EngineArgs(**changes)
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(EngineArgs(), **changes)


def test_a_missing_gpu_is_found_when_loading_not_before():
    args = EngineArgs(device="cuda")  # (a driver may describe replicas that run elsewhere)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            args.load_model()


def test_llm_keyword_defaults_are_engine_args_defaults():
    params = inspect.signature(LLM.__init__).parameters
    default = EngineArgs()
    for name, p in params.items():
        if name in ("self", "loaded"):
            continue
        want = torch.float32 if name == "dtype" else getattr(default, name)
        assert p.default == want, name
    assert default.dtype == "float32" and default.kv_cache_tokens == 32768  # (what LLM always had)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def _config(llm: LLM) -> dict:
    cache, engine = llm.engine.cache, llm.engine
    return {"slots": cache.num_slots, "chunk": cache.chunk_size, "dtype": cache.dtype, "device": cache.device,
            "share": cache.share_prefixes, "retain": cache.retain_prefixes,
            "eviction": type(cache.tree.policy).__name__, "engine": engine.config,
            "scheduler": engine.scheduler.config, "backend": type(engine.runner.attn).__name__}


@pytest.mark.parametrize("options", [
    {},
    {"kv_cache_tokens": 1000, "chunk_size": 16, "max_num_batched_tokens": 96, "max_num_seqs": 5,
     "prefix_sharing": False, "eviction": "longest-first", "backend": "reference", "scheduling_policy": "fcfs"},
    {"max_overtakes": 0},
])
def test_llm_keywords_and_engine_args_build_the_same_engine(tiny, options):
    by_keywords = LLM(loaded=tiny, **options)
    by_args = LLM.from_args(EngineArgs(**options), loaded=tiny)  # (one model for both: nothing loaded here)
    assert _config(by_keywords) == _config(by_args)
    assert by_args.args == EngineArgs(**options)
    assert by_keywords.args == EngineArgs(**options, dtype=torch.float32)  # (LLM's default dtype is the torch.dtype)
    if options:
        assert _config(by_args) != _config(LLM(loaded=tiny))
    with pytest.raises(TypeError, match="args must be an EngineArgs"):
        LLM.from_args({"chunk_size": 16})  # type: ignore[arg-type]


def test_engine_args_load_the_model_they_name():
    llm = LLM.from_args(EngineArgs(str(TINY_CONFIG), random_weights=True, kv_cache_tokens=256, chunk_size=16))
    assert llm.loaded.config.num_layers == 2 and llm.engine.cache.num_slots == 16
    out = llm.generate([[5, 6, 7]], {"max_tokens": 2, "temperature": 0, "ignore_eos": True})  # type: ignore[arg-type]
    assert len(out[0].token_ids) == 2


def test_chat_template_from_a_file_or_inline(tmp_path, monkeypatch):
    """``chat_template`` (a file or the template itself) goes on a copy of the loaded tokenizer; the loaded
    model's own stays as it was (it may serve other engines); a model without a tokenizer cannot take one."""
    from chunkattn.engine.args import read_chat_template
    from chunkattn.model.loader import default_model_path, load_tokenizer

    inline = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    path = tmp_path / "t.jinja"
    path.write_text(inline)
    assert read_chat_template(path) == read_chat_template(str(path)) == read_chat_template(inline) == inline
    monkeypatch.chdir(tmp_path)
    assert EngineArgs(chat_template="t.jinja").chat_template == str(path)  # (replicas run elsewhere)
    assert EngineArgs(chat_template=inline).chat_template == inline
    tiny = tiny_model()
    with pytest.raises(ValueError, match="no tokenizer"):
        LLM.from_args(EngineArgs(chat_template=inline), loaded=tiny)
    loaded = dataclasses.replace(tiny, tokenizer=load_tokenizer(default_model_path()))
    own = loaded.tokenizer.chat_template
    llm = LLM.from_args(EngineArgs(chat_template=str(path)), loaded=loaded)
    assert llm.tokenizer.chat_template == inline and loaded.tokenizer.chat_template == own
    assert llm.tokenizer.decode(llm.apply_chat_template([{"role": "user", "content": "hi"}])) == "[user] hi\n"


def test_engine_args_pickle():
    args = dataclasses.replace(OTHER, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert pickle.loads(pickle.dumps(args)) == args


def test_engine_spec_is_engine_args_for_replicas():
    pytest.importorskip("ray")
    from chunkattn.cluster.serve import EngineSpec

    spec = EngineSpec(str(TINY_CONFIG), random_weights=True, chunk_size=16, threads=1)
    assert isinstance(spec, EngineArgs) and spec.kv_cache_tokens == SERVING_KV_CACHE_TOKENS
    assert pickle.loads(pickle.dumps(spec)) == spec  # (Ray ships it to every replica)
    assert EngineSpec.from_engine_args(OTHER, threads=3) == EngineSpec(**OTHER.engine_kwargs(), threads=3)
    with pytest.raises(ValueError, match="threads must be"):
        EngineSpec(threads=-1)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        EngineSpec(chunk_size=0)
    ns = build_parser().parse_args(["serve", "--replicas", "2", "--replica-threads", "3", "--chunk-size", "32"])
    assert EngineSpec.from_engine_args(EngineArgs.from_cli_args(ns), threads=ns.replica_threads) == \
        EngineSpec(chunk_size=32, threads=3)


def test_bench_serve_takes_its_engine_options_from_engine_args():
    cfg = ServeConfig()
    assert cfg.engine == EngineArgs(kv_cache_tokens=SERVING_KV_CACHE_TOKENS)
    flat = cfg.as_dict()  # a result's "config": the keys results always had
    assert list(flat) == ["requests", "rate", "system_prompts", "shared_len", "question_len", "output_len",
                          "kv_cache_tokens", "chunk_size", "max_num_batched_tokens", "scheduling_policy",
                          "max_overtakes", "seed"]
    assert flat["kv_cache_tokens"] == SERVING_KV_CACHE_TOKENS and flat["chunk_size"] == 64
    other = ServeConfig(requests=3, seed=5, engine=EngineArgs(kv_cache_tokens=4096, chunk_size=8))
    assert ServeConfig.from_dict(other.as_dict()) == other
    with pytest.raises(TypeError, match="engine must be an EngineArgs"):
        ServeConfig(engine={"kv_cache_tokens": 1})  # type: ignore[arg-type]
