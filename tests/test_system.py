"""`chunkattn info`: the CPU, its features and the kernel path each part takes, consistent with what runs."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from chunkattn import native
from chunkattn.cli import main
from chunkattn.engine import host
from chunkattn.system import FEATURES, cpu, info


def test_info_reports_the_paths_that_run(capsys):
    data = info()
    assert data["torch"] == torch.__version__ and data["native_kernels"] == native.available()
    assert set(data["cpu"]["features"]) <= set(FEATURES) and data["cpu"]["usable_cpus"] >= 1
    paths = data["paths"]
    if native.available():
        amx = bool(torch.ops.chunkattn_cpu.amx_active())
        assert ("amx tiles" in paths["attention"]) == amx
        assert ("AMX panels" in paths["linear bfloat16"]) == native.amx_linear_supported()
        assert ("AVX512-BF16 dot products" in paths["linear bfloat16"]) == (
            native.bf16_panels_supported() and not native.amx_linear_supported())
        assert ("chunkattn panels" in paths["linear float32"]) == native.linear_supported()
        from chunkattn.model.quant import kernel_supported

        assert ("as stored" in paths["linear quantized"]) == kernel_supported()
        if kernel_supported():  # the quantized kernel is built only where the CPU has AVX512-BF16
            assert "avx512_bf16" in cpu()["features"]
        if amx:  # the tile path runs only where the CPU says it has tiles
            assert {"amx_tile", "amx_bf16"} <= set(cpu()["features"])
    assert main(["info", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["paths"] == paths and printed["cpu"]["model"] == data["cpu"]["model"]
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "features:" in text and "attention:" in text and data["cpu"]["model"] in text
    if platform.machine() in ("x86_64", "AMD64"):  # family and model number tell generations apart (Zen 4 / 5)
        c = data["cpu"]
        assert c["family"] >= 6 and c["model_number"] >= 0
        assert f"family {c['family']} model {c['model_number']}" in text


def _memory_of(env_update: dict[str, str | None]) -> dict:
    """`chunkattn info --json`'s memory section from a fresh process started as a user starts it."""
    env = dict(os.environ)
    for k, v in env_update.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    out = subprocess.run([sys.executable, "-m", "chunkattn.cli", "info", "--json"], env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return json.loads(out)["memory"]


def test_the_command_line_asks_malloc_for_huge_pages(monkeypatch):
    plain = {"GLIBC_TUNABLES": None, "CHUNKATTN_HUGE_PAGES": None}
    for k in plain:
        monkeypatch.delenv(k, raising=False)
    if host.huge_pages_env() is None:
        pytest.skip(f"no transparent huge pages for malloc here (kernel THP {host.thp_mode()}, "
                    f"libc {platform.libc_ver()})")
    # started plainly: the command runs again with the tunable, and says so
    assert _memory_of(plain) == {"transparent_huge_pages": host.thp_mode(), "malloc_huge_pages": True}
    # switched off, or the user's own hugetlb setting: left alone
    assert _memory_of({**plain, "CHUNKATTN_HUGE_PAGES": "0"})["malloc_huge_pages"] is False
    assert _memory_of({**plain, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})["malloc_huge_pages"] is False
    # other tunables of the user's stay, the huge pages join them
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert host.huge_pages_env()["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
    assert host.huge_pages_env() is None


def test_main_called_from_python_never_replaces_the_process(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
    assert main(["info", "--json"]) == 0
    assert calls == [] and "memory" in json.loads(capsys.readouterr().out)
