#!/usr/bin/env bash
# Stages the GPU Python check for the device machine (which has no Rust toolchain): builds the
# cdylib with the CUDA feature and copies it with the Python client and its tests into
# .gpu/py/ (carry `.gpu` to the device). On the device:
#   cd .gpu/py && ELRA_LIB=$PWD/libelra.so python3 -m pytest -q -rs tests/test_torch_gpu.py
# NVCC must point at nvcc (see build.rs), e.g.
#   export NVCC=$(ls ~/.cache/nvcc-13.0/lib/python3*/site-packages/nvidia/cu13/bin/nvcc)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --features cuda --lib
out=.gpu/py
rm -rf "$out"
mkdir -p "$out"
cp target/release/libelra.so "$out/"
# Debug line tables are not needed there and the carried tree is size-limited.
if command -v strip >/dev/null; then strip --strip-debug "$out/libelra.so"; fi
cp -r python/elra python/tests "$out/"
find "$out" -name __pycache__ -type d -prune -exec rm -rf {} +
echo "staged $out: $(du -sh "$out" | cut -f1)"
echo "device: cd $out && ELRA_LIB=\$PWD/libelra.so python3 -m pytest -q -rs tests/test_torch_gpu.py"
