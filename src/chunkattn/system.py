"""What this machine is and which kernel path each part of chunkattn takes on it: the CPU, the instruction-set
features the kernels dispatch on, threads, library versions. ``chunkattn info`` prints it, ``/version`` returns
it and ``chunkattn serve`` logs it once at start-up, so that every number can be traced to the path that made it.
"""

from __future__ import annotations

import os
import platform
import re
from typing import Any

import torch

from chunkattn import native

# CPU features the kernels dispatch on (Linux /proc/cpuinfo flag names), from the widest down.
FEATURES = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx512bw", "avx512f",
            "avx2", "fma", "asimd", "sve")


def cpu() -> dict[str, Any]:
    """The CPU model, its logical CPUs (and those this process may use) and which of :data:`FEATURES` it has; on x86
    also its family and model numbers, which tell CPU generations apart where a VM names only the brand ("AMD
    EPYC": family 25 is Zen 3 / Zen 4, 26 is Zen 5)."""
    model, flags, ids = platform.processor() or platform.machine(), set(), {}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        model = found.group(1).strip() if found else model
        line = re.search(r"^(flags|Features)\s*:\s*(.+)$", text, re.M)
        flags = set(line.group(2).split()) if line else set()
        for key, name in (("family", "cpu family"), ("model_number", "model")):
            found = re.search(rf"^{name}\s*:\s*(\d+)\s*$", text, re.M)
            if found:
                ids[key] = int(found.group(1))
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "arch": platform.machine(), **ids, "logical_cpus": os.cpu_count(),
            "usable_cpus": usable, "features": [f for f in FEATURES if f in flags]}


def onednn_version() -> str | None:
    found = re.search(r"MKL-DNN v([\d.]+)", torch.__config__.show())
    return found.group(1) if found else None


def _quantized_paths() -> str:
    """The quantized kernel's paths here: the rows up to which each kind multiplies its stored integers (directly,
    or with x as integers), and what takes more rows (the kernel's own choice: ``quant.auto_path``)."""
    from chunkattn.model import quant

    if not quant.kernel_supported():
        return "not kept (dequantized at load): the quantized kernel needs AVX512-BF16"

    def rows_taking(kind: int, path: int) -> int:
        rows = 0
        while rows < 256 and quant.auto_path(kind, rows + 1) == path:
            rows += 1
        return rows

    def listed(path: int) -> str:  # "q4 16, q5 12, ...": the kinds that take `path` for their first rows
        return ", ".join(f"{name} {rows}" for name, kind in quant.KINDS.items() if (rows := rows_taking(kind, path)))

    direct, int_x = listed(3), listed(4)
    more = "AMX tiles" if quant.auto_path(quant.KINDS["q4"], 256) == 1 else "vdpbf16ps"
    return ("Q4_0/Q4_1/Q5_1/Q8_0/Q6_K/IQ4_NL as stored (Q4_K/Q5_K/Q5_0/IQ4_XS read into them, Q3_K into q3x16, "
            "Q2_K into q2x16; bfloat16): "
            + (f"up to {int_x} rows with x as 15-bit integers (vpdpbusd), " if int_x else "")
            + f"up to {direct} rows from the integers directly (vdpbf16ps), more rows dequantized per panel ({more})")


def kernel_paths() -> dict[str, str]:
    """Which implementation runs each part on this machine, per dtype (``native`` kernels built here or not)."""
    if not native.available():
        reason = "native kernels unavailable (no compiler, or CHUNKATTN_NATIVE=0)"
        return {"attention": f"torch (vectorized PyTorch): {reason}",
                "linear float32": "oneDNN packed" if torch.backends.mkldnn.is_available() else "F.linear",
                "linear bfloat16": "oneDNN packed" if torch.backends.mkldnn.is_available() else "F.linear",
                "linear quantized": f"not kept (dequantized at load): {reason}",
                "elementwise": "PyTorch ops", "layer loop": "Python"}
    fp32_linear = ("chunkattn panels (AVX-512 register tiles)" if native.linear_supported()
                   else "oneDNN packed")
    from chunkattn.model.layers import Linear

    bf16_linear = (f"chunkattn AMX panels (at every row count up to K = {Linear.AMX_ALL_ROWS_MAX_K}; with a longer "
                   f"K while x is within {Linear.AMX_BLOCK_BYTES >> 20} MB, at least {Linear.AMX_MIN_ROWS_LIMIT} "
                   "rows, F.linear (oneDNN) above)" if native.amx_linear_supported()
                   else "chunkattn panels by AVX512-BF16 dot products (vdpbf16ps, every row count)"
                   if native.bf16_panels_supported() else "oneDNN packed")
    return {"attention": "cpu: " + str(torch.ops.chunkattn_cpu.attention_paths()),
            "linear float32": fp32_linear, "linear bfloat16": bf16_linear, "linear quantized": _quantized_paths(),
            "elementwise": "chunkattn native (RMSNorm, RoPE, SiLU-and-multiply)",
            "layer loop": layer_loop()}


def layer_loop() -> str:
    """How the decoder's layers run one step (:mod:`chunkattn.model.native_layers`)."""
    from chunkattn.model import native_layers

    if not native_layers.enabled():
        return f"Python ({native_layers.ENV}=0)"
    return ("native (chunkattn_layers.DecoderStack) on the cpu attention backend unless a linear layer runs on "
            "oneDNN's packed product; Python otherwise")


def info() -> dict[str, Any]:
    """Everything above as one JSON-able dict."""
    from chunkattn import __version__

    return {"chunkattn": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "onednn": onednn_version(), "cpu": cpu(), "torch_threads": torch.get_num_threads(),
            "native_kernels": native.available(), "paths": kernel_paths(), "memory": memory()}


def memory() -> dict[str, Any]:
    """How this process's memory is paged: the kernel's transparent-huge-page mode and whether malloc asks for
    them (see :func:`chunkattn.engine.host.huge_pages_env`)."""
    from chunkattn.engine.host import malloc_huge_pages, thp_mode

    return {"transparent_huge_pages": thp_mode(), "malloc_huge_pages": malloc_huge_pages()}


def format_info(data: dict[str, Any]) -> str:
    c = data["cpu"]
    ids = f", family {c['family']} model {c['model_number']}" if "family" in c and "model_number" in c else ""
    lines = [f"chunkattn {data['chunkattn']}  (python {data['python']}, torch {data['torch']}, "
             f"oneDNN {data['onednn'] or 'none'})",
             f"cpu:      {c['model']} ({c['arch']}{ids}), {c['usable_cpus']} of {c['logical_cpus']} logical CPUs "
             f"usable, torch threads {data['torch_threads']}",
             f"features: {' '.join(c['features']) or 'none of ' + ', '.join(FEATURES)}"]
    lines += [f"{k + ':':<17} {v}" for k, v in data["paths"].items()]
    m = data.get("memory", {})
    lines.append(f"{'memory:':<17} transparent huge pages {m.get('transparent_huge_pages') or 'unknown'}, malloc "
                 + ("uses them (GLIBC_TUNABLES=glibc.malloc.hugetlb=1)" if m.get("malloc_huge_pages")
                    else "does not ask for them"))
    return "\n".join(lines)
