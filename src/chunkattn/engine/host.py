"""Host (CPU-process) tuning: keep freed memory instead of faulting it in again (the engine, once), and back
malloc's memory with transparent huge pages (the command line, at start)."""

from __future__ import annotations

import functools
import logging
import os
import platform
import sys

from chunkattn.utils import libc

log = logging.getLogger(__name__)

# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of handing it back to the OS (Linux only).

    A CPU step allocates and frees activations of tens of MB; by default glibc serves those with fresh
    ``mmap`` pages and returns them at ``free``, so every step pays a page fault per 4 KB (measured on the dev
    machine: a 1088-token prefill of SmolLM2 took 1.9 s with the default, 0.8 s without the faults). This is
    what vLLM gets by preloading tcmalloc. It changes the process's allocator settings; set
    ``CHUNKATTN_KEEP_FREED_MEMORY=0`` to leave them alone. Returns whether the settings were applied.
    """
    c = libc()
    if os.environ.get("CHUNKATTN_KEEP_FREED_MEMORY", "1") == "0" or c is None:
        return False
    try:
        ok = all([c.mallopt(_M_MMAP_THRESHOLD, 1 << 30),  # serve big blocks from the heap ...
                  c.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1),  # ... and never give its top back
                  c.mallopt(_M_TOP_PAD, 64 << 20)])  # grow it in 64 MB steps
    except AttributeError:  # not glibc
        return False
    log.debug("chunkattn: malloc keeps freed memory (%s)", "applied" if ok else "refused")
    return bool(ok)


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"  # glibc >= 2.35: malloc madvises its heap and mmaps for THP
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``), None where unknown."""
    try:
        with open(THP_ENABLED) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def _thp_granted() -> bool:
    """Whether the kernel backs a region with huge pages when malloc asks (THP ``always`` or ``madvise``)."""
    return thp_mode() in ("always", "madvise")


def malloc_huge_pages() -> bool:
    """Whether this process started with glibc's malloc asking for transparent huge pages (the tunable is read at
    process start only) in a kernel that grants them."""
    return HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":") and _thp_granted()


def huge_pages_env() -> dict[str, str] | None:
    """The environment to run this process again with so that malloc backs its memory with transparent huge
    pages, or None: already so, switched off (``CHUNKATTN_HUGE_PAGES=0``), not Linux with glibc >= 2.35, or the
    kernel's huge pages off.

    The activations and the K/V cache are read in strided rows (a tile of 16 rows of x spans 16 pages of 4 KB
    at K >= 2048), where 4 KB pages cost TLB misses; with 2 MB pages, measured on the 2-core Xeon VM with AMX
    (in-process engine steps, alternated three times): SmolLM2's decode steps 0.93-0.96x the time and the first
    prefill 0.92-0.95x; the Llama-3.2-1B shape's (bf16) decode steps 0.96-0.97x, its 1088-token prefill
    0.89-0.94x. glibc reads the tunable at process start only, hence running the process again.
    """
    if os.environ.get("CHUNKATTN_HUGE_PAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    name, version = platform.libc_ver()
    try:
        new_enough = name == "glibc" and tuple(int(x) for x in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        new_enough = False
    if not new_enough or not _thp_granted():
        return None
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:  # set already (by us, or by the user: theirs stands)
        return None
    return {**os.environ, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE}


def rerun_with_huge_pages() -> None:
    """Replace this process by the same command line with :func:`huge_pages_env` (a no-op where that is None);
    for a program's start, before it has done anything worth keeping."""
    env = huge_pages_env()
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, list(sys.orig_argv), env)
    except OSError as exc:  # run on as we are
        log.warning("chunkattn: could not restart with huge pages for malloc (%s); running without", exc)
