#!/usr/bin/env bash
# Stages the PEFT interoperability check (python/tests/test_peft_interop.py) for a machine that
# has torch and peft but no Rust toolchain: builds the CPU cdylib (`cargo build --release --lib`)
# and copies it with the Python client and its tests into .gpu/peft/ (git-ignored).
#
# Run there, from the repository root with .gpu/peft carried (CPU torch; no GPU is used):
#   cd .gpu/peft && CUDA_VISIBLE_DEVICES= ELRA_LIB=$PWD/libelra.so PYTHONPATH=$PWD \
#     PYTHONDONTWRITEBYTECODE=1 python3 -m pytest -q -rs -p no:cacheprovider tests/test_peft_interop.py
# Success: every test passes and none is skipped (a skip names the missing module).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --lib
dst=.gpu/peft
rm -rf "$dst"
mkdir -p "$dst"
cp target/release/libelra.so "$dst/"
cp -r python/elra python/tests "$dst/"
find "$dst" -name __pycache__ -prune -exec rm -rf {} +
echo "staged $(du -sh "$dst" | cut -f1) in $dst:"
(cd "$dst" && find . -type f | sort)
