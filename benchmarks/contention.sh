#!/usr/bin/env bash
# Serving beside other work: the serve workload (row a: 32 requests on one 1024-token system prompt, 64 own, 64
# out) through chunkattn and through vLLM's CPU build, each alone and then beside BUSY busy-loop processes at nice
# 19 (a background compile, a batch job), alternated. A nice-19 process gets ~1.5% of a core against a nice-0 one
# under Linux's CFS, so a server should lose about that much; spinning OpenMP threads that lose their core for a
# whole scheduler slice lose far more.
#
#   benchmarks/contention.sh        (knobs: RUNS=2 BUSY=2 DTYPE=bfloat16 SYSTEMS="chunkattn vllm"
#                                    CHUNKATTN_ENV="" extra environment for chunkattn, e.g. GOMP_SPINCOUNT=10000
#                                    OUT_JSON=benchmarks/results/contention-<date>.json)
# vLLM runs from benchmarks/peer_vllm_cpu.sh's venv and HF directory (run its setup and convert first), with that
# script's settings (VLLM_CPU_OMP_THREADS_BIND=0-1, OMP_WAIT_POLICY as VLLM_OMP_WAIT_POLICY).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEER_DIR=${PEER_DIR:-/work/peer}
VPY=${VPY:-$PEER_DIR/vllm-venv/bin/python}
HF_DIR=${HF_DIR:-$PEER_DIR/smollm2-hf}
PYTHON=${PYTHON:-python}
RUNS=${RUNS:-2}
BUSY=${BUSY:-2}
DTYPE=${DTYPE:-bfloat16}
SYSTEMS=${SYSTEMS:-"chunkattn vllm"}
CHUNKATTN_ENV=${CHUNKATTN_ENV:-}
OUT_JSON=${OUT_JSON:-$REPO/benchmarks/results/contention-$(date +%F).json}
SCRATCH=$PEER_DIR/runs/contention-$(date +%Y%m%d-%H%M%S)
mkdir -p "$SCRATCH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"  # vLLM's side takes chunkattn's workload generator
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4} VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-1}
VLLM_OMP_WAIT_POLICY=${VLLM_OMP_WAIT_POLICY-PASSIVE}
FLAGS="--requests 32 --rate inf --system-prompts 1 --shared-len 1024 --question-len 64 --output-len 64"

log() { echo "[contention $(date +%T)] $*" >&2; }

busy_pids=()
start_busy() {
    local i
    for ((i = 0; i < BUSY; i++)); do
        nice -n 19 "$PYTHON" -c 'while True: pass' &
        busy_pids+=($!)
    done
}
stop_busy() {
    ((${#busy_pids[@]})) && kill "${busy_pids[@]}" 2>/dev/null || true
    wait "${busy_pids[@]}" 2>/dev/null || true
    busy_pids=()
}
trap stop_busy EXIT

run_one() {  # system mode run
    local out=$SCRATCH/$1-$2-$3.json
    case $1 in
        chunkattn)
            # shellcheck disable=SC2086
            env $CHUNKATTN_ENV "$PYTHON" -m chunkattn.cli bench serve --systems chunkattn $FLAGS --dtype "$DTYPE" \
                --json "$out" --no-progress >"$out.log" 2>&1 ;;
        vllm)
            # shellcheck disable=SC2086
            env ${VLLM_OMP_WAIT_POLICY:+OMP_WAIT_POLICY=$VLLM_OMP_WAIT_POLICY} "$VPY" \
                "$REPO/benchmarks/peer_vllm_serve.py" --model "$HF_DIR" --dtype "$DTYPE" $FLAGS --no-idle \
                --json "$out" >"$out.log" 2>&1
            local i
            for ((i = 0; i < 60; i++)); do pgrep -f 'VLLM::' >/dev/null || break; sleep 1; done ;;
    esac
}

for ((run = 1; run <= RUNS; run++)); do
    for system in $SYSTEMS; do
        for mode in alone busy; do
            log "$system $mode run $run"
            [[ $mode == busy ]] && start_busy
            run_one "$system" "$mode" "$run"
            stop_busy
        done
    done
done

SCRATCH=$SCRATCH OUT_JSON=$OUT_JSON BUSY=$BUSY DTYPE=$DTYPE CHUNKATTN_ENV=$CHUNKATTN_ENV "$PYTHON" - <<'EOF'
import json, os, pathlib, statistics, time
from chunkattn.bench.kernel import git_commit
from chunkattn.system import info
d = pathlib.Path(os.environ["SCRATCH"])
rows = {}
for p in sorted(d.glob("*.json")):
    system, mode, _ = p.stem.split("-")
    r = json.loads(p.read_text())["rows"][0]
    rows.setdefault(system, {}).setdefault(mode, []).append(r)
out = {"date": time.strftime("%Y-%m-%d"), "busy_processes": int(os.environ["BUSY"]), "busy_nice": 19,
       "dtype": os.environ["DTYPE"], "chunkattn_env": os.environ["CHUNKATTN_ENV"],
       "commit": git_commit(),
       "system": info(), "systems": {}}
for system, modes in rows.items():
    med = {m: statistics.median(r["output_tokens_per_s"] for r in rs) for m, rs in modes.items()}
    tpot = {m: statistics.median(r["tpot_p50_ms"] for r in rs) for m, rs in modes.items()}
    out["systems"][system] = {"output_tok_s": med, "tpot_p50_ms": tpot,
                              "busy_over_alone": round(med["busy"] / med["alone"], 3) if len(med) == 2 else None,
                              "runs": {m: [r["output_tokens_per_s"] for r in rs] for m, rs in modes.items()}}
    print(system, json.dumps(out["systems"][system]))
pathlib.Path(os.environ["OUT_JSON"]).write_text(json.dumps(out, indent=1) + "\n")
print("wrote", os.environ["OUT_JSON"])
EOF
