"""The core runs without the optional extras; a feature that needs one says which and how to install it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chunkattn.extras import EXTRAS

ROOT = Path(__file__).resolve().parents[1]

# A process in which no package of the server / bench / cluster extras can be imported.
BLOCK = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = {blocked!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, Block())
""")


def run_without_extras(code: str) -> subprocess.CompletedProcess[str]:
    blocked = sorted({m for mods in EXTRAS.values() for m in mods})
    return subprocess.run([sys.executable, "-c", BLOCK.format(blocked=blocked) + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_the_core_imports_and_runs_without_any_extra():
    out = run_without_extras("""
        import torch
        import chunkattn, chunkattn.cli, chunkattn.demo, chunkattn.model.loader, chunkattn.engine.structured
        from chunkattn import LLM, PrefixKVCache, attention
        cache = PrefixKVCache(1, 1, 8, chunk_size=4, max_tokens=64, dtype=torch.float32)
        seq = cache.add_sequence([1, 2, 3])
        batch = cache.extend([seq], [[1, 2, 3]])
        cache.store(0, batch, torch.randn(3, 1, 8), torch.randn(3, 1, 8))
        print(attention(torch.randn(3, 2, 8), cache, batch, 0, backend="torch").shape)
        for mod in ("fastapi", "matplotlib", "httpx", "ray", "pydantic"):
            assert mod not in sys.modules, mod
    """)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([3, 2, 8])" in out.stdout


def test_a_feature_without_its_extra_names_the_install_command():
    out = run_without_extras("""
        import chunkattn.cli
        sys.exit(chunkattn.cli.main(["serve", "--port", "1"]))
    """)
    assert out.returncode == 2, out.stderr
    assert "needs the 'server' extra" in out.stderr and "pip install 'chunkattn[server]'" in out.stderr
    out = run_without_extras("""
        from chunkattn.bench.kernel import plot
        plot({"rows": []}, "/dev/null")
    """)
    assert out.returncode != 0 and "needs the 'bench' extra" in out.stderr and "matplotlib" in out.stderr


def test_pyproject_extras_declare_what_extras_py_requires():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).replace("-", "_").lower()
    for extra, modules in EXTRAS.items():
        declared = " ".join(project["optional-dependencies"][extra]).replace("-", "_").lower()
        for module in modules:
            assert module in declared, (extra, module)
            assert module not in core, f"{module} is a core dependency but belongs to the {extra} extra"
    dev = " ".join(project["optional-dependencies"]["dev"])
    assert "chunkattn[server,bench]" in dev  # the README's test command installs what the tests drive
