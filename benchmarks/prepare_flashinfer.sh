#!/usr/bin/env bash
# Downloads FlashInfer's pure-Python wheel (it JIT-compiles its CUDA kernels on first use, with the machine's nvcc)
# and apache-tvm-ffi, its one import missing from the GPU machine's image (the device library's KINDS.md lists
# what is there), into .whl/ (git-ignored): ~9 MB to carry to a GPU machine that has no network, installed there
# by benchmarks/gpu_check.sh without resolving anything. Python 3.12 wheels: the image's python3.
# FlashInfer 0.5.3: the newest whose wheel fits a call's 64 MiB (0.7.4's is 101 MB); issue 24's table was
# measured with 0.3.1, which has no wheel on PyPI and whose sdist no longer builds here.
set -euo pipefail
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl flashinfer-python==0.5.3 apache-tvm-ffi==0.1.9
ls -la .whl
