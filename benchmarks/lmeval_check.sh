#!/usr/bin/env bash
# A third-party client against `chunkattn serve` (issue 8): EleutherAI's lm-evaluation-harness scores a small
# local multiple-choice task (benchmarks/lmeval/chunkattn_mc.jsonl) twice on the same weights:
#   1. `local-completions` through chunkattn's server (loglikelihoods from echo + logprobs, prompts as token
#      ids, the server's own tokenizer through /tokenize, /detokenize and /tokenizer_info: tokenizer_backend=remote)
#   2. lm-eval's own `hf` model (transformers) on the Hugging Face directory the server loads
# and writes both accuracies to one JSON. They must be equal.
#
#   benchmarks/lmeval_check.sh            (PEER_DIR=/work/peer, LMEVAL_VENV=$PEER_DIR/lmeval-venv, HF_DIR=$PEER_DIR/smollm2-hf)
#
# SERVE_MODEL / SERVE_ARGS serve something else against the same hf reference, e.g. the default GGUF with its
# Q4_1 blocks kept as stored (SERVE_MODEL=default SERVE_ARGS="--dtype bfloat16") or dequantized in float32
# (SERVE_ARGS="--dtype float32"); EXPECT_EQUAL=0 then records the agreement without requiring equality.
#
# Set-up once: the virtualenv gets `lm-eval[api,hf]` with torch pinned to this machine's CPU build (an unpinned
# torch would pull a CUDA build); the HF directory is made from the SmolLM2 GGUF by
# `benchmarks/peer_vllm_cpu.sh convert`. Traffic stays on 127.0.0.1; nothing is downloaded at run time.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEER_DIR=${PEER_DIR:-/work/peer}
LMEVAL_VENV=${LMEVAL_VENV:-$PEER_DIR/lmeval-venv}
HF_DIR=${HF_DIR:-$PEER_DIR/smollm2-hf}
PYTHON=${PYTHON:-python}
PORT=${PORT:-8411}
SERVE_MODEL=${SERVE_MODEL:-$HF_DIR}
SERVE_ARGS=${SERVE_ARGS:-}
EXPECT_EQUAL=${EXPECT_EQUAL:-1}
OUT_JSON=${OUT_JSON:-$REPO/benchmarks/results/lmeval-$(date +%F).json}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

log() { echo "[lmeval_check $(date +%T)] $*" >&2; }

if [[ ! -x $LMEVAL_VENV/bin/lm_eval ]]; then
    log "creating $LMEVAL_VENV with lm-eval (a few minutes)"
    "$PYTHON" -m venv "$LMEVAL_VENV"
    "$LMEVAL_VENV/bin/pip" install -q "lm-eval[api,hf]" "torch==2.13.0"
fi
if [[ ! -f $HF_DIR/config.json ]]; then
    "$REPO/benchmarks/peer_vllm_cpu.sh" convert
fi

scratch=$(mktemp -d)
trap 'kill $server_pid 2>/dev/null || true; [[ -n ${KEEP_SCRATCH:-} ]] || rm -rf "$scratch"' EXIT
cp "$REPO/benchmarks/lmeval/chunkattn_mc.jsonl" "$scratch/"
sed "s#DATA_FILE#$scratch/chunkattn_mc.jsonl#" "$REPO/benchmarks/lmeval/chunkattn_mc.yaml" > "$scratch/chunkattn_mc.yaml"

model_arg=()
[[ $SERVE_MODEL == default ]] || model_arg=("$SERVE_MODEL")
log "starting chunkattn serve ${model_arg[*]:-(the default GGUF)} $SERVE_ARGS on 127.0.0.1:$PORT"
# shellcheck disable=SC2086
"$PYTHON" -m chunkattn.cli serve "${model_arg[@]}" $SERVE_ARGS --served-model-name smol --port "$PORT" \
    --log-level warning > "$scratch/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
    kill -0 $server_pid 2>/dev/null || { cat "$scratch/server.log"; exit 1; }
    sleep 0.5
done

log "lm-eval local-completions through the server"
start=$(date +%s.%N)
"$LMEVAL_VENV/bin/lm_eval" --model local-completions \
    --model_args "model=smol,base_url=http://127.0.0.1:$PORT/v1/completions,tokenizer_backend=remote,num_concurrent=8,max_retries=1,timeout=600" \
    --tasks chunkattn_mc --include_path "$scratch" --output_path "$scratch/server" --log_samples \
    > "$scratch/server-eval.log" 2>&1 || { tail -40 "$scratch/server-eval.log"; exit 1; }
server_s=$(echo "$(date +%s.%N) - $start" | bc)
metrics=$(curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^chunkattn:prefix_cache_(queries|hits)_total' || true)
kill $server_pid; wait $server_pid 2>/dev/null || true

log "lm-eval hf (transformers) on $HF_DIR"
start=$(date +%s.%N)
"$LMEVAL_VENV/bin/lm_eval" --model hf --model_args "pretrained=$HF_DIR,dtype=float32" --device cpu --batch_size 8 \
    --tasks chunkattn_mc --include_path "$scratch" --output_path "$scratch/hf" --log_samples \
    > "$scratch/hf-eval.log" 2>&1 || { tail -40 "$scratch/hf-eval.log"; exit 1; }
hf_s=$(echo "$(date +%s.%N) - $start" | bc)

commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -z $(git -C "$REPO" status --porcelain --untracked-files=no -- . ':!benchmarks/results' 2>/dev/null) ]] || commit="$commit (uncommitted changes)"
"$PYTHON" - "$scratch" "$OUT_JSON" "$server_s" "$hf_s" "$metrics" "$SERVE_MODEL $SERVE_ARGS" "$EXPECT_EQUAL" "$commit" <<'EOF'
import glob, json, sys, time
from chunkattn.system import info
scratch, out, server_s, hf_s, metrics, served, expect_equal, commit = sys.argv[1:9]

def load(kind):
    path = sorted(glob.glob(f"{scratch}/{kind}/**/results_*.json", recursive=True))[-1]
    res = json.load(open(path))
    samples = sorted(glob.glob(f"{scratch}/{kind}/**/samples_chunkattn_mc_*.jsonl", recursive=True))[-1]
    rows = [json.loads(l) for l in open(samples)]
    return res, {r["doc_id"]: r for r in rows}

server, server_rows = load("server")
hf, hf_rows = load("hf")
s, h = server["results"]["chunkattn_mc"], hf["results"]["chunkattn_mc"]
agree = sum(server_rows[i]["acc"] == hf_rows[i]["acc"] for i in hf_rows)
max_ll_diff = max(abs(float(a[0][0]) - float(b[0][0])) for i in hf_rows
                  for a, b in zip(server_rows[i]["resps"], hf_rows[i]["resps"]))
result = {
    "benchmark": "lm-evaluation-harness through chunkattn serve vs its hf model (issue 8)",
    "date": time.strftime("%Y-%m-%d"), "commit": commit, "system": info(), "lm_eval": server.get("lm_eval_version"),
    "task": "chunkattn_mc (45 questions, benchmarks/lmeval/chunkattn_mc.jsonl)",
    "server": {"acc": s["acc,none"], "acc_norm": s["acc_norm,none"], "seconds": round(float(server_s), 1),
               "model_args": "local-completions, tokenizer_backend=remote, num_concurrent=8",
               "serve": served.strip(),
               "prefix_cache": metrics.splitlines()},
    "hf": {"acc": h["acc,none"], "acc_norm": h["acc_norm,none"], "seconds": round(float(hf_s), 1)},
    "per_question_acc_agreement": f"{agree}/{len(hf_rows)}",
    "max_abs_loglikelihood_diff": max_ll_diff,
    "equal": s["acc,none"] == h["acc,none"] and s["acc_norm,none"] == h["acc_norm,none"],
}
json.dump(result, open(out, "w"), indent=1)
print(json.dumps(result, indent=1))
sys.exit(0 if result["equal"] or expect_equal == "0" else 1)
EOF
