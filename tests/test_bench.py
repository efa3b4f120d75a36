"""The kernel benchmark CLI end to end on tiny shapes: rows, JSON keys, errors, memory accounting, plot."""

from __future__ import annotations

import json

import pytest

from chunkattn.bench.kernel import Config, build_workload
from chunkattn.cli import main

ROW_KEYS = {"provider", "batch", "shared", "private", "heads", "kv_heads", "head_dim", "dtype", "chunk_size",
            "median_us", "rel_err", "kv_bytes", "gbps", "roofline_us"}


def test_bench_kernel_cli_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["bench", "kernel", "--batch", "3", "--shared", "64", "128", "--private", "5", "--heads", "4",
               "--kv-heads", "2", "--head-dim", "16", "--chunk-size", "16", "--providers", "naive", "sdpa",
               "reference", "tpp-torch", "tpp-triton", "--no-progress", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert {"device", "torch", "rows", "copy_gbps", "commit"} <= result.keys()
    rows = result["rows"]
    assert len(rows) == 2 * 4  # tpp-triton needs CUDA: skipped with a note, not a row
    assert "tpp-triton" in result["skipped"] and "cuda" in result["skipped"]["tpp-triton"]
    for row in rows:
        assert ROW_KEYS <= row.keys()
        assert row["rel_err"] < 1e-5 and row["median_us"] > 0
    by = {(r["provider"], r["shared"]): r for r in rows}
    for shared in (64, 128):
        dense = by[("sdpa", shared)]["kv_bytes"]
        assert dense == 2 * 3 * (shared + 5) * 2 * 16 * 4
        assert by[("tpp-torch", shared)]["kv_bytes"] < dense  # the shared prompt is stored once
    assert png.stat().st_size > 1000
    assert "| tpp-torch | 3 | 128 | 5 |" in capsys.readouterr().out


def test_bench_points_and_bad_arguments(tmp_path):
    out = tmp_path / "p.json"
    assert main(["bench", "kernel", "--points", "2,16,3", "1,0,4", "--heads", "2", "--head-dim", "16",
                 "--chunk-size", "8", "--providers", "tpp-torch", "--no-progress", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["shared"], r["private"]) for r in rows] == [(2, 16, 3), (1, 0, 4)]
    assert main(["bench", "kernel", "--points", "2,16", "--no-progress"]) == 2
    assert main(["bench", "kernel", "--heads", "3", "--kv-heads", "2", "--no-progress"]) == 2


def test_workload_memory_matches_the_tree():
    w = build_workload(Config(32, 4096, 512, 2, 2, 16, 64, "float32", "cpu"))
    chunks = 4096 // 64 + 32 * 512 // 64
    assert w.cache.stats()["kv_bytes"] == chunks * w.cache.chunk_bytes
    saving = 1 - w.cache.stats()["kv_bytes"] / w.dense_kv_bytes()
    assert saving == pytest.approx(1 - (4096 + 32 * 512) / (32 * 4608))


def test_a_failing_provider_is_reported_not_fatal(monkeypatch, tmp_path):
    from chunkattn.bench import kernel

    table = kernel.provider_table()

    def broken(w):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(kernel, "provider_table", lambda: {**table, "tpp-triton": broken})
    out = tmp_path / "e.json"
    rc = main(["bench", "kernel", "--batch", "2", "--shared", "16", "--private", "3", "--heads", "2",
               "--head-dim", "16", "--chunk-size", "8", "--providers", "tpp-torch", "tpp-triton", "--no-progress",
               "--json", str(out)])
    result = json.loads(out.read_text())
    assert rc == 1 and [r["provider"] for r in result["rows"]] == ["tpp-torch"]
    assert "kernel exploded" in result["errors"]["tpp-triton"][0]
