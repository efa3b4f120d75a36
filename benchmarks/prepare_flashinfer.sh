#!/usr/bin/env bash
# Builds FlashInfer 0.3.1's pure-Python wheel (it JIT-compiles its CUDA on first use) into .whl/ (git-ignored),
# for carrying to a GPU machine that has no network. Run here, in a venv that has torch.
set -euo pipefail
work=$(mktemp -d)
python3 -m pip download -q --no-deps --no-binary :all: -d "$work" flashinfer-python==0.3.1
tar -xzf "$work"/flashinfer_python-0.3.1.tar.gz -C "$work"
mkdir -p .whl
(cd "$work"/flashinfer_python-0.3.1 && python3 -m pip wheel -q --no-deps --no-build-isolation -w "$OLDPWD/.whl" .)
ls -la .whl
