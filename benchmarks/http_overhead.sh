#!/usr/bin/env bash
# The server's HTTP overhead (issue 8): the same shared-prefix workload through the in-process engine
# (`chunkattn bench serve --systems chunkattn`) and through `chunkattn serve` driven over HTTP by
# `chunkattn bench serve --url`, alternated RUNS times; one JSON with every run and the throughput ratio.
# The client runs on the same machine as the server (on 2 cores it takes CPU from the engine: that is part
# of what this measures).
#
#   benchmarks/http_overhead.sh          (RUNS=2 PORT=8500 DTYPE=float32, OUT_JSON=benchmarks/results/http-overhead-<date>.json)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=${RUNS:-2}
PORT=${PORT:-8500}
DTYPE=${DTYPE:-float32}
PYTHON=${PYTHON:-python}
OUT_JSON=${OUT_JSON:-$REPO/benchmarks/results/http-overhead-$(date +%F).json}
WORKLOAD=(--requests 32 --shared-len 1024 --question-len 64 --output-len 64 --kv-cache-tokens 65536 --chunk-size 64
          --max-num-batched-tokens 2048 --no-progress)
export HF_HUB_OFFLINE=1
scratch=$(mktemp -d)
server_pid=
trap '[[ -n $server_pid ]] && kill $server_pid 2>/dev/null; rm -rf "$scratch"' EXIT

for r in $(seq 1 "$RUNS"); do
    "$PYTHON" -m chunkattn.cli bench serve --systems chunkattn --dtype "$DTYPE" "${WORKLOAD[@]}" \
        --json "$scratch/inproc-$r.json" > /dev/null
    "$PYTHON" -m chunkattn.cli serve --port "$PORT" --dtype "$DTYPE" --kv-cache-tokens 65536 --chunk-size 64 \
        --max-num-batched-tokens 2048 --log-level warning > "$scratch/server-$r.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 240); do curl -sf "127.0.0.1:$PORT/health" > /dev/null && break; sleep 0.5; done
    "$PYTHON" -m chunkattn.cli bench serve --url "http://127.0.0.1:$PORT" "${WORKLOAD[@]}" \
        --json "$scratch/http-$r.json" > /dev/null
    kill $server_pid; wait $server_pid 2>/dev/null || true
    server_pid=
done

"$PYTHON" - "$scratch" "$OUT_JSON" "$RUNS" "$DTYPE" "$(git -C "$REPO" rev-parse --short HEAD)" <<'EOF'
import json, statistics, sys, time
scratch, out, runs, dtype, commit = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
rows = {k: [json.load(open(f"{scratch}/{k}-{r}.json"))["rows"][0] for r in range(1, runs + 1)] for k in ("inproc", "http")}
keys = ("output_tokens_per_s", "ttft_p50_ms", "tpot_p50_ms", "ttft_cold_ms", "ttft_hit_ms", "prefix_hit_rate")
summary = {k: {key: statistics.median(r[key] for r in v) for key in keys} for k, v in rows.items()}
ratio = summary["http"]["output_tokens_per_s"] / summary["inproc"]["output_tokens_per_s"]
result = {"benchmark": "HTTP overhead: chunkattn serve + bench serve --url vs the in-process engine (issue 8)",
          "date": time.strftime("%Y-%m-%d"), "commit": commit, "dtype": dtype, "runs": runs,
          "workload": "32 requests at once, 1 shared prompt x 1024 + 64-token question, 64 output tokens",
          "summary": summary, "http_vs_inproc_throughput": round(ratio, 3), "runs_detail": rows}
json.dump(result, open(out, "w"), indent=1)
print(json.dumps({"summary": summary, "http_vs_inproc_throughput": round(ratio, 3)}, indent=1))
EOF
