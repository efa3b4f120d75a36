"""An on-disk cache of converted GGUF checkpoints, so that only the first start pays for the conversion.

Reading a GGUF file means dequantizing every tensor through transformers' GGUF reader and building its
tokenizer from the file's vocabulary: ~20 s for SmolLM2-135M on a 2-core machine, at every start. The first
load writes what it produced as a Hugging Face directory (``config.json``, ``model.safetensors`` in float32,
the tokenizer's files) under ``$CHUNKATTN_CACHE_DIR`` (default ``~/.cache/chunkattn``, or
``$XDG_CACHE_HOME/chunkattn``), in ``gguf/<sha256 of the file>-v<format>-tf<transformers version>/``; later
loads read that directory (memory-mapped safetensors) instead.

The key is the file's content hash (memoized per path, size and modification time in ``gguf/index.json``,
so an unchanged file is not hashed again), the cache's format and the transformers version (the converter).
A directory appears atomically (written aside, then renamed), so a crash leaves no half entry.
``CHUNKATTN_WEIGHT_CACHE=0`` turns the cache off. A cache that cannot be written costs a warning, not the
load. Disk: float32 weights, 4 bytes per parameter (SmolLM2-135M: ~540 MB).

A quantized load (blocks kept as stored, :mod:`chunkattn.model.quant`) caches what it read beside it, in
``<entry>-blocks-v<BLOCKS_FORMAT>/`` (``<entry>-blocks-<type>-v<BLOCKS_FORMAT>/`` for a load quantized to a type,
``--quantization q4_0``): the blocks as :class:`~chunkattn.model.quant.Blocks` holds them (Q4 values two a byte,
as GGUF stores them), the other tensors in bfloat16 (SmolLM2: ~90 MB).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("chunkattn.load")

FORMAT = 1  # bump when what is written changes
# the same for the quantized entries (<entry>-blocks-v<n>): chunkattn.model.quant.Blocks' layout (2: Q4 values two
# a byte; 3: Q5_0 / Q4_K read into blocks, other tensors in bfloat16; -<type> entries: quantized at load to it;
# 4: Q6_K kept as blocks; 5: Q5_1 / Q5_K as q5_1 blocks; 6: IQ4_NL / IQ4_XS as iq4_nl, Q3_K as q6_k blocks;
# 7: Q3_K / Q2_K as q4x16 blocks; 8: Q2_K as q2x16 blocks; 9: Q3_K as q3x16 blocks)
BLOCKS_FORMAT = 9


def cache_root() -> Path | None:
    """Where converted checkpoints go (None: the cache is off)."""
    if os.environ.get("CHUNKATTN_WEIGHT_CACHE", "1").strip().lower() in ("0", "off", "false", "no"):
        return None
    root = os.environ.get("CHUNKATTN_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "chunkattn"


def file_digest(path: Path, root: Path | None = None) -> str:
    """SHA-256 of ``path``'s content, memoized in ``root/gguf/index.json`` by path, size and mtime."""
    st = path.stat()
    memo_key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    index_path = root / "gguf" / "index.json" if root is not None else None
    index: dict[str, str] = {}
    if index_path is not None and index_path.exists():
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError):
            index = {}
        if memo_key in index:
            return index[memo_key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    digest = h.hexdigest()
    if index_path is not None:
        index[memo_key] = digest
        try:
            index_path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(index_path, json.dumps(index, indent=1))
        except OSError as exc:
            log.warning("could not update %s: %s", index_path, exc)
    return digest


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def entry_dir(gguf: Path) -> Path | None:
    """The cache directory for ``gguf`` (it may not exist yet); None when the cache is off."""
    root = cache_root()
    if root is None:
        return None
    import transformers

    return root / "gguf" / f"{file_digest(gguf, root)[:32]}-v{FORMAT}-tf{transformers.__version__}"


def lookup(gguf: Path) -> Path | None:
    """The cached HF directory of ``gguf``, if a complete one exists."""
    try:
        entry = entry_dir(gguf)
    except Exception as exc:  # noqa: BLE001 - e.g. no home directory: the cache must never fail a load
        log.warning("the weight cache is unusable (%s): converting %s", exc, gguf.name)
        return None
    if entry is not None and (entry / "complete").exists():
        return entry
    return None


def store(gguf: Path, hf_config: dict[str, Any], weights: dict[str, torch.Tensor], tokenizer: Any) -> Path | None:
    """Write the converted checkpoint of ``gguf``; returns its directory (None: the cache is off or the
    write failed, with a warning)."""
    from safetensors.torch import save_file

    entry = None
    try:
        entry = entry_dir(gguf)
        if entry is None:
            return None
        with _new_entry(entry, gguf, FORMAT, synced="model.safetensors") as tmp:
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=1, default=str))
            tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in weights.items()}
            seen: dict[int, str] = {}
            for k, v in tensors.items():  # safetensors refuses tensors that share memory
                if v.data_ptr() in seen:
                    tensors[k] = v.clone()
                seen[v.data_ptr()] = k
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"source": gguf.name, "format": "pt"})
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
    except Exception as exc:  # noqa: BLE001 - caching is best effort: never fail the load for it
        log.warning("could not cache the converted weights of %s (%s): the next start converts again",
                    gguf.name, exc)
        return None
    size = sum(f.stat().st_size for f in entry.iterdir()) / 2**20
    log.info("cached the converted checkpoint in %s (%.0f MiB; CHUNKATTN_WEIGHT_CACHE=0 turns this off)", entry,
             size)
    return entry


@contextlib.contextmanager
def _new_entry(entry: Path, gguf: Path, fmt: int, synced: str) -> Iterator[Path]:
    """Write a cache entry atomically: the caller fills the yielded temporary directory; then ``synced`` (its big
    file) and a ``complete`` marker reach the disk and the directory is renamed to ``entry``. An incomplete
    ``entry`` (an older writer's, a partial drop) is replaced; a complete one another process wrote first is kept.
    On any error the temporary directory goes."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    _sweep(entry.parent)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=entry.name + ".tmp"))
    try:
        yield tmp
        _fsync(tmp / synced)
        (tmp / "complete").write_text(json.dumps({"source": str(gguf), "format": fmt}))
        _fsync(tmp / "complete")
        if entry.exists() and not (entry / "complete").exists():
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.replace(tmp, entry)
        except OSError:  # another process wrote it first
            if not (entry / "complete").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    """Data on disk before the entry is renamed into place (a crash must not leave ``complete`` beside a
    truncated file)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _sweep(directory: Path, older_than_s: float = 3600.0) -> None:
    """Remove temporary directories of writers that died (an hour old: no live writer takes that long)."""
    import time

    for tmp in directory.glob("*.tmp*"):
        try:
            if tmp.is_dir() and time.time() - tmp.stat().st_mtime > older_than_s:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def drop(entry: Path) -> None:
    """Remove a cache entry that could not be read (it is converted and written again)."""
    shutil.rmtree(entry, ignore_errors=True)


def lookup_tokenizer(gguf: Path) -> Path | None:
    """A cached directory holding ``gguf``'s tokenizer (a whole checkpoint's, or a tokenizer-only entry)."""
    found = lookup(gguf)
    if found is not None:
        return found
    try:
        entry = entry_dir(gguf)
    except Exception:  # noqa: BLE001 - (lookup warned already)
        return None
    if entry is not None and (entry.parent / (entry.name + "-tokenizer") / "complete").exists():
        return entry.parent / (entry.name + "-tokenizer")
    return None


def store_tokenizer(gguf: Path, tokenizer: Any) -> None:
    """Cache ``gguf``'s tokenizer alone (when only the tokenizer was read from it, e.g. ``--tokenizer``)."""
    try:
        entry = entry_dir(gguf)
        if entry is None:
            return
        final = entry.parent / (entry.name + "-tokenizer")
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=final.name + ".tmp"))
        try:
            tokenizer.save_pretrained(str(tmp))
            (tmp / "complete").write_text(json.dumps({"source": str(gguf), "format": FORMAT}))
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except Exception as exc:  # noqa: BLE001 - best effort
        log.warning("could not cache the tokenizer of %s (%s)", gguf.name, exc)


def _blocks_dir(gguf: Path, variant: str | None = None) -> Path | None:
    """Where the blocks of ``gguf``'s quantized load go (``variant``: the type it was quantized to, if asked)."""
    entry = entry_dir(gguf)
    kind = f"-{variant}" if variant else ""
    return None if entry is None else entry.parent / f"{entry.name}-blocks{kind}-v{BLOCKS_FORMAT}"


def cached_blocks_bytes(gguf: Path, variant: str | None = None) -> int | None:
    """The size of the blocks cached for ``gguf`` (what :func:`lookup_blocks` would read), or None."""
    try:
        entry = _blocks_dir(gguf, variant)
        if entry is None or not (entry / "complete").exists():
            return None
    except Exception:  # noqa: BLE001 - the cache must never fail a load
        return None
    try:
        return (entry / "weights.safetensors").stat().st_size
    except OSError as exc:  # a damaged entry (it would block writing a new one): read the file again
        log.warning("the weight cache entry %s is unreadable (%s): reading %s again", entry, exc, gguf.name)
        drop(entry)
        return None


def lookup_blocks(gguf: Path, variant: str | None = None
                  ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]] | None:
    """The config, dense tensors and quantized blocks (:class:`chunkattn.model.quant.Blocks`, Hugging Face names)
    cached for ``gguf``'s quantized load (:func:`store_blocks`; ``variant``: quantized to that type), or None.
    Reading the GGUF file itself takes seconds: its tokenizer metadata is parsed with the tensors."""
    from safetensors import safe_open

    from chunkattn.model.quant import Blocks

    try:
        entry = _blocks_dir(gguf, variant)
    except Exception as exc:  # noqa: BLE001 - the cache must never fail a load
        log.warning("the weight cache is unusable (%s)", exc)
        return None
    if entry is None or not (entry / "complete").exists():
        return None
    try:
        cfg = json.loads((entry / "config.json").read_text())
        types = json.loads((entry / "blocks.json").read_text())
        tensors = {}
        file = entry / "weights.safetensors"
        for keys in safetensors_key_groups(file):  # copied, a group mapped at a time
            with safe_open(str(file), framework="pt") as f:
                for key in keys:
                    tensors[key] = f.get_tensor(key).clone()
        blocks = {name: Blocks(qtype, tensors.pop(f"{name}@q"), tensors.pop(f"{name}@d"),
                               tensors.pop(f"{name}@m", None)) for name, qtype in types.items()}
        return cfg, tensors, blocks
    except Exception as exc:  # noqa: BLE001 - a damaged entry: read the file again (and rewrite it)
        log.warning("the weight cache entry %s is unreadable (%s: %s): reading %s again", entry, type(exc).__name__,
                    exc, gguf.name)
        drop(entry)
        return None


# at most this many bytes of a safetensors file mapped at a time while its tensors are copied out, beyond one
# larger tensor (safetensors_key_groups)
MAP_BYTES = 64 << 20


def safetensors_key_groups(path: Path, limit: int | None = None) -> list[list[str]]:
    """The tensor names of the safetensors file ``path`` in file order, grouped into runs of at most ``limit`` bytes
    of data (default: :data:`MAP_BYTES`, or the largest tensor's if smaller; a larger tensor alone), from its
    header (8 bytes of length, then JSON with each tensor's offsets). A reader maps the file for one group at a
    time: the pages read stay resident while it is mapped (a whole 5 GB shard's would add its size to a load's
    RSS), so a group adds at most ``limit`` bytes to what one tensor at a time holds, while opening the file once a
    tensor parsed its header ~700 times for SmolLM2's cached blocks (0.5 s of every start). A header that cannot be
    a safetensors file's raises ValueError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > min(size - 8, 100 << 20):
            raise ValueError(f"{path} is not a safetensors file (a header of {length} bytes in {size}; a Git LFS "
                             "pointer, or a damaged file?)")
        header = json.loads(f.read(length))
    spans = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    if limit is None:
        limit = min(MAP_BYTES, max((end - begin for (begin, end), _ in spans), default=0))
    groups: list[list[str]] = []
    start = None
    for (begin, end), key in spans:
        if start is None or end - start > limit:
            groups.append([])
            start = begin
        groups[-1].append(key)
    return groups


def store_blocks(gguf: Path, hf_config: dict[str, Any], dense: dict[str, torch.Tensor],
                 blocks: dict[str, Any], variant: str | None = None) -> None:
    """Cache what :func:`chunkattn.model.loader.gguf_blocks` read from ``gguf`` (best effort, atomically): the
    blocks, the other tensors as read (bfloat16)."""
    from safetensors.torch import save_file

    try:
        entry = _blocks_dir(gguf, variant)
        if entry is None:
            return
        with _new_entry(entry, gguf, BLOCKS_FORMAT, synced="weights.safetensors") as tmp:
            tensors = {k: v.detach().contiguous() for k, v in dense.items()}
            for name, b in blocks.items():
                tensors[f"{name}@q"], tensors[f"{name}@d"] = b.q.contiguous(), b.d.contiguous()
                if b.m is not None:
                    tensors[f"{name}@m"] = b.m.contiguous()
            save_file(tensors, str(tmp / "weights.safetensors"), metadata={"source": gguf.name, "format": "pt"})
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=1, default=str))
            (tmp / "blocks.json").write_text(json.dumps({name: b.qtype for name, b in blocks.items()}))
    except Exception as exc:  # noqa: BLE001 - best effort
        log.warning("could not cache the blocks of %s (%s): the next start reads the file again", gguf.name, exc)
        return
    log.info("cached the blocks of %s in %s (%.0f MiB)", gguf.name, entry,
             sum(f.stat().st_size for f in entry.iterdir()) / 2**20)
    # earlier formats' entries of this file, of every variant (unread now; a variant's would otherwise stay until
    # that variant is cached again)
    for old in entry.parent.glob(entry.name.split("-blocks", 1)[0] + "-blocks*-v*"):
        version = old.name.rsplit("-v", 1)[1]
        if version.isdigit() and int(version) < BLOCKS_FORMAT:  # (a newer chunkattn's entries are left alone)
            drop(old)


__all__ = ["BLOCKS_FORMAT", "FORMAT", "cache_root", "cached_blocks_bytes", "drop", "entry_dir", "file_digest", "lookup",
           "lookup_blocks", "lookup_tokenizer", "store", "store_blocks", "store_tokenizer"]
