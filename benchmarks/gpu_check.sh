#!/usr/bin/env bash
# One call on a lent GPU machine for issue 24: the machine's ceilings, the GPU tests, the paper's kernel sweep
# against every peer (eager and as CUDA graphs), the fp16 serve benchmark with sharing on and off, and FlashInfer's
# providers last (their kernels compile on first use). Under $OUT (at most the 8 files a call brings back):
# log.txt (every part's output), kernel.json / .png, kernel-flashinfer.json, serve.json / .png, targets.md; then
# `python benchmarks/gpu_targets.py $OUT/kernel.json $OUT/kernel-flashinfer.json` compares them with the issue's
# targets. Each part runs under its own time limit whatever the others did, and all within BUDGET seconds (540 by
# default: a device command may run 600), and the last line says which parts failed.
#   device run:  CHUNKATTN_COMMIT=<commit> bash benchmarks/gpu_check.sh
#                (carry .whl with FlashInfer's wheel: benchmarks/prepare_flashinfer.sh builds it)
#   PARTS="tests kernel"  runs only those parts (env tests kernel serve flashinfer);
#   DRY=1                 runs every part here on the CPU at tiny shapes (Triton interpreted): checks the script.
# Uses the machine's own torch / triton / transformers: never lets pip resolve the project's pins there.
set -uo pipefail
OUT=${OUT:-out}
PARTS=${PARTS:-"env tests kernel serve flashinfer"}
DRY=${DRY:-0}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  DEVICE=cpu; DTYPE=float32; SHAPE=(--heads 2 --head-dim 64 --chunk-size 16)
  POINTS=(2,32,16 3,16,32); REQUESTS=4; SHARED=64; OUTPUT=4; SLOWER=3  # (the interpreter: longer limits)
else
  export CHUNKATTN_NATIVE=0  # (the CPU kernels: nothing here needs them, and their build would take a minute)
  DEVICE=cuda; DTYPE=float16; SHAPE=(--heads 32 --head-dim 128 --chunk-size 64)
  # issue 24's rows: B, shared n_s, private n_c
  POINTS=(32,1024,64 32,2048,64 32,4096,64 32,1024,512 32,2048,512 32,4096,512 64,2048,64 128,2048,64 32,16,1024)
  REQUESTS=32; SHARED=1024; OUTPUT=64; SLOWER=1
fi
if [ "$DRY" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then  # (Python 3.12 wheels, for the GPU image)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
failed=()
BUDGET=${BUDGET:-540}
deadline=$((SECONDS + BUDGET * SLOWER))
: > "$OUT/log.txt"
wants() { [[ " $PARTS " == *" $1 "* ]]; }
# part NAME SECONDS COMMAND...: run it under its time limit (benchmarks/parts.sh), cut to what the budget has left
source "$(dirname "${BASH_SOURCE[0]}")/parts.sh"
part() {
  local name=$1 limit=$(($2 * SLOWER)) left=$((deadline - SECONDS - 15)); shift 2
  [ "$limit" -le "$left" ] || limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "== $name: skipped, the budget is spent"; failed+=("$name(no time)"); return
  fi
  run_part "$name" "$limit" "$@"
}

if wants env; then
  part env 60 python3 - <<'EOF'
import datetime, os, subprocess, torch
print("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
print("commit", os.environ.get("CHUNKATTN_COMMIT", "unknown"))
print("torch", torch.__version__)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton missing:", exc)
try:
    import flashinfer
    print("flashinfer", flashinfer.__version__)
except Exception as exc:  # noqa: BLE001
    print("flashinfer not importable:", type(exc).__name__, exc)
if torch.cuda.is_available():
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                          "--format=csv"], capture_output=True, text=True).stdout)
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.multi_processor_count} SMs, L2 {p.L2_cache_size / 2**20:.0f} MiB")
    # the two ceilings (METHOD.md): a large device-to-device copy (bytes read + written) and a bf16 matmul
    from chunkattn.bench.kernel import copy_bandwidth_gbps, time_median_us
    print(f"copy GB/s: {copy_bandwidth_gbps(torch.device('cuda'), 1 << 30):.0f}")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    us = time_median_us(lambda: a @ a, torch.device("cuda"), max_reps=10)
    print(f"bf16 matmul TFLOP/s: {2 * 8192**3 / (us * 1e-6) / 1e12:.0f}")
EOF
fi

if wants tests; then  # the kernels compiled (fp16, bf16, head dims 64 / 128 / 256, GQA), and the engine on them
  part tests 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_triton.py \
    tests/test_engine_triton.py
fi

KERNEL=(python3 -m chunkattn.cli bench kernel --device "$DEVICE" --dtype "$DTYPE" "${SHAPE[@]}"
        --points "${POINTS[@]}" --cuda-graph --no-progress)
# the sweep(s) so far against issue 24's targets (again after FlashInfer's)
targets() {
  [ -f "$OUT/kernel.json" ] || return 0
  local files=("$OUT/kernel.json")
  [ -f "$OUT/kernel-flashinfer.json" ] && files+=("$OUT/kernel-flashinfer.json")
  python3 benchmarks/gpu_targets.py "${files[@]}" > "$OUT/targets.md" 2>&1
  local rc=$?
  cat "$OUT/targets.md"
  return $rc
}

if wants kernel; then
  part kernel 150 "${KERNEL[@]}" --providers sdpa sdpa-flash paged-triton tpp-torch tpp-triton \
    --json "$OUT/kernel.json" --plot "$OUT/kernel.png"
  targets
fi

if wants serve; then  # issue 24: decode tokens/s with sharing >= 3x without, 32 requests on a 1K prompt
  part serve 120 python3 -m chunkattn.cli bench serve --model benchmarks/configs/smollm2-135m.json \
    --random-weights --device "$DEVICE" --dtype "$DTYPE" --systems chunkattn no-sharing --requests "$REQUESTS" \
    --shared-len "$SHARED" --question-len 64 --output-len "$OUTPUT" --no-progress \
    --json "$OUT/serve.json" --plot "$OUT/serve.png"
fi

if wants flashinfer; then  # last: its first call of each kernel compiles it (nvcc), which may take minutes
  export FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}  # (Hopper only)
  part flashinfer 200 "${KERNEL[@]}" --providers flashinfer-paged flashinfer-cascade tpp-triton \
    --json "$OUT/kernel-flashinfer.json"
fi

targets || failed+=("targets(missed: see targets.md)")
echo "gpu_check: ${#failed[@]} part(s) failed${failed[*]:+: ${failed[*]}}"
exit $(( ${#failed[@]} > 0 ))
