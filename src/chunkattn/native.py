"""chunkattn's native CPU kernels (``csrc/*.cpp``): compiled on first use, loaded as PyTorch operators.

``torch.utils.cpp_extension`` builds them once per machine with its C++ compiler (about 20 s; cached under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) for the CPU it runs on (``-march=native``).
Operators: ``torch.ops.chunkattn_cpu.tpp`` (attention, see :mod:`chunkattn.attention.cpu_tpp`) and
``torch.ops.chunkattn_layers.*`` (packed float32 and AMX bfloat16 linear products and fused elementwise layers,
see :mod:`chunkattn.model.layers`). When the build fails (no compiler), :func:`available` is False and every
caller falls back to plain PyTorch, with a warning.
Set ``CHUNKATTN_NATIVE=0`` to skip the native kernels altogether.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

log = logging.getLogger(__name__)
SOURCES = tuple(sorted((Path(__file__).parent / "csrc").glob("*.cpp")))


class KernelBuildError(RuntimeError):
    """The native CPU kernels could not be compiled or loaded on this machine."""


def _machine_tag() -> str:
    """A short hash of this CPU's feature flags: a build made with -march=native for another CPU (a shared
    home directory) must not be loaded here."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _source_tag() -> str:
    """A short hash of every file in csrc/: torch's JIT build notices a changed .cpp but not a changed header
    (simd.h), so the header's version is part of the extension's name."""
    h = hashlib.sha1()
    for path in sorted((Path(__file__).parent / "csrc").iterdir()):
        if path.suffix in (".cpp", ".h"):
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:8]


@functools.cache
def _build() -> None:
    if os.environ.get("CHUNKATTN_NATIVE", "1") == "0":
        raise RuntimeError("disabled by CHUNKATTN_NATIVE=0")
    from torch.utils.cpp_extension import load

    # -fopenmp: at::parallel_for is inline OpenMP, so without it every kernel would run on one thread; the
    # library it links (libgomp.so.1) is the one torch already loaded.
    load(name=f"chunkattn_cpu_{_machine_tag()}_{_source_tag()}", sources=[str(s) for s in SOURCES],
         is_python_module=False, verbose=False,
         extra_cflags=["-O3", "-march=native", "-std=c++17", "-fno-math-errno", "-fopenmp"],
         extra_ldflags=["-fopenmp"])


def load() -> None:
    """Compile (once per machine) and load the kernels; raises :class:`KernelBuildError` with the reason."""
    try:
        _build()
    except Exception as exc:  # noqa: BLE001 - any compiler/loader failure means: not available here
        _warn_once(str(exc))
        raise KernelBuildError(f"cannot build chunkattn's CPU kernels: {exc}") from exc


@functools.cache
def _warn_once(reason: str) -> None:
    log.warning("chunkattn: the native CPU kernels are unavailable (%s); using plain PyTorch", reason)


@functools.cache
def available() -> bool:
    """Whether the native CPU kernels are compiled and loaded (compiling them on the first call)."""
    try:
        load()
    except KernelBuildError:
        return False
    return True


@functools.cache
def bf16_panels_supported() -> bool:
    """Whether ``chunkattn_layers.linear_amx`` runs here at all: on AMX tiles (:func:`amx_linear_supported`), else by
    AVX512-BF16 dot products (``vdpbf16ps``) on the same packed panels (a build for a CPU with AVX512-BF16)."""
    if not available():
        return False
    import torch

    return bool(torch.ops.chunkattn_layers.bf16_panels_supported())


@functools.cache
def amx_linear_supported() -> bool:
    """Whether ``chunkattn_layers.linear_amx`` multiplies on AMX tiles here (elsewhere it may run by AVX512-BF16
    dot products: :func:`bf16_panels_supported`): built for a CPU with AMX (amx_tile, amx_bf16) and the OS granted
    the process the tile state."""
    if not available():
        return False
    import torch

    return bool(torch.ops.chunkattn_layers.amx_linear_supported())


@functools.cache
def linear_supported() -> bool:
    """Whether ``chunkattn_layers.linear`` (float32 products from packed panels) suits this CPU: it was built
    with AVX-512 (on narrower vector units its register tile would spill; oneDNN does better there)."""
    if not available():
        return False
    import torch

    return bool(torch.ops.chunkattn_layers.linear_supported())
