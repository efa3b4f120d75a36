#!/usr/bin/env bash
# One call on a lent GPU machine: GPU tests, then the paper's kernel sweep against every peer, results under $OUT.
#   device run: bash benchmarks/gpu_check.sh            (carry .whl if FlashInfer's wheel is to be used)
# Uses the machine's own torch/triton: never lets pip resolve the project's pins there.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
{ date -u; git rev-parse HEAD 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)';
  python3 -c 'import flashinfer; print("flashinfer", flashinfer.__version__)' 2>&1 | tail -1; } | tee "$OUT/env.txt"

# 1. Correctness on the GPU: Triton kernels compiled (bf16 included) and the torch backend on CUDA tensors.
timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_triton.py tests/test_attention.py 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

# 2. The paper's shapes (H=32 q/kv heads, d=128, fp16, c=64), every provider, eager and CUDA graph.
timeout 240 python3 -m chunkattn.cli bench kernel --device cuda --dtype float16 --heads 32 --head-dim 128 \
  --chunk-size 64 --points 32,1024,64 32,4096,64 32,2048,512 32,4096,512 128,2048,64 32,16,1024 \
  --providers sdpa sdpa-flash paged-triton flashinfer-paged flashinfer-cascade tpp-torch tpp-triton \
  --cuda-graph --no-progress --json "$OUT/kernel.json" --plot "$OUT/kernel.png" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
