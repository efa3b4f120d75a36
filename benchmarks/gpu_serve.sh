#!/usr/bin/env bash
# One call on a lent GPU machine: the end-to-end serving benchmark in fp16 with the Triton backend, on a model of
# SmolLM2-135M's shape with random weights (the 98 MB GGUF exceeds what a call can carry; speed does not depend on
# the weights' values). Results under $OUT. Uses the machine's own torch/triton/transformers.
#   device run: bash benchmarks/gpu_serve.sh
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 500 python3 -m chunkattn.cli bench serve --model benchmarks/configs/smollm2-135m.json --random-weights \
  --device cuda --dtype float16 --requests 32 --shared-len 1024 --question-len 64 --output-len 64 --no-progress \
  --json "$OUT/serve.json" --plot "$OUT/serve.png" 2>&1 | tee "$OUT/serve.log"
