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


def test_gpu_targets_compares_tpp_triton_with_issue_24s_targets(tmp_path, capsys):
    """benchmarks/gpu_targets.py: the best of eager and graph time per provider, the target min(1.5 x roofline
    + 5, best peer / 1.2) on shared rows and 1.05x the best peer on the nothing-shared row, FlashInfer's rows from a
    second file, and a non-zero exit where tpp-triton misses a target."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("gpu_targets", Path(__file__).parents[1] / "benchmarks" /
                                                  "gpu_targets.py")
    gpu_targets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_targets)

    def row(provider, b, ns, nc, us, graph=None, roof=10.0):
        return {"provider": provider, "batch": b, "shared": ns, "private": nc, "chunk_size": 64, "median_us": us,
                "graph_median_us": graph, "roofline_us": roof}

    ours = {"device": "H100", "date": "2026-12-07", "commit": "abc", "rows": [
        row("sdpa-flash", 32, 1024, 64, 200.0), row("tpp-triton", 32, 1024, 64, 30.0, graph=18.0),
        row("sdpa-flash", 32, 16, 1024, 100.0, roof=80.0), row("tpp-triton", 32, 16, 1024, 110.0, graph=104.0)],
        "skipped": {"flashinfer-cascade": "needs flashinfer"}}
    theirs = {"rows": [row("flashinfer-cascade", 32, 1024, 64, 60.0, graph=54.0),
                       row("flashinfer-paged", 32, 16, 1024, 99.0)], "skipped": {}}
    (tmp_path / "a.json").write_text(json.dumps(ours))
    (tmp_path / "b.json").write_text(json.dumps(theirs))
    assert gpu_targets.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1  # (a miss, below)
    out = capsys.readouterr().out
    # shared row: target min(1.5 * 10 + 5, 54 / 1.2) = 20; ours 18 (graph) -> 0.90x, 3.00x faster than cascade
    assert "| 32 | 1024 | 64 | 10.0 | 200.0 | - | 54.0 | - | 18.0 | 20.0 | 0.90x | 3.00x faster |" in out
    # nothing shared: 1.05 x 99 = 103.95; ours 104 -> a miss
    assert "| 32 | 16 | 1024 | 80.0 | 100.0 | 99.0 | - | - | 104.0 | 104.0 | 1.00x (miss) | - |" in out
    assert "needs flashinfer" not in out  # (skipped in one file, measured in the other)
    ours["rows"][-1]["graph_median_us"] = 103.0
    (tmp_path / "a.json").write_text(json.dumps(ours))
    assert gpu_targets.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    ours["rows"][-1]["graph_median_us"] = 106.0  # without FlashInfer's file: 1.05 x 100 = 105
    (tmp_path / "a.json").write_text(json.dumps(ours))
    assert gpu_targets.main([str(tmp_path / "a.json")]) == 1
