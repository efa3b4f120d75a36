"""``chunkattn bench serve`` end to end on a tiny random-weight model: every system runs, rows carry the keys."""

from __future__ import annotations

import json

from chunkattn.cli import main

ROW_KEYS = {"system", "sharing", "requests", "output_tokens_per_s", "decode_tokens_per_s", "ttft_p50_ms",
            "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "peak_kv_bytes", "prefix_hit_rate"}


def test_bench_serve_cli(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "max_position_embeddings": 512, "tie_word_embeddings": True}))
    out = tmp_path / "serve.json"
    # all requests at once: they run side by side, so sharing must lower the peak K/V (with Poisson arrivals a
    # fast machine can finish each request before the next arrives, and both peaks are one request's)
    rc = main(["bench", "serve", "--model", str(config), "--random-weights", "--requests", "6", "--rate", "inf",
               "--system-prompts", "2", "--shared-len", "48", "--question-len", "5", "--output-len", "4",
               "--chunk-size", "8", "--kv-cache-tokens", "4096", "--no-progress", "--json", str(out),
               "--plot", str(tmp_path / "serve.png")])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"chunkattn", "no-sharing", "hf"}
    for row in rows.values():
        assert ROW_KEYS <= row.keys() and row["requests"] == 6 and row["output_tokens_per_s"] > 0
    assert rows["chunkattn"]["prefix_hit_rate"] > 0.5 and rows["no-sharing"]["prefix_hit_rate"] == 0
    assert rows["chunkattn"]["peak_kv_bytes"] < rows["no-sharing"]["peak_kv_bytes"]
    assert rows["chunkattn"]["ttft_hit_ms"] > 0 and rows["chunkattn"]["ttft_cold_ms"] > 0
    assert (tmp_path / "serve.png").stat().st_size > 1000
    assert "sharing vs no sharing" in capsys.readouterr().out
