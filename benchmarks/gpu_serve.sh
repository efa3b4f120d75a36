#!/usr/bin/env bash
# The end-to-end serving benchmark alone on a lent GPU machine: fp16, Triton backend, a model of SmolLM2-135M's
# shape with random weights (speed does not depend on the weights' values), 32 requests on a 1K shared prompt, with
# prefix sharing on and off. The serve part of benchmarks/gpu_check.sh (see there; results under $OUT).
#   device run: bash benchmarks/gpu_serve.sh
PARTS=serve exec bash "$(dirname "$0")/gpu_check.sh"
