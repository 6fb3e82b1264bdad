#!/usr/bin/env bash
# Regenerates include/elra.h from src/capi/ (only that module tree is parsed, so public constants
# of other modules never leak into the header) with the pinned cbindgen, and fails if it differs
# from the committed header (ABI drift). `scripts/check-header.sh --write` updates the header.
set -euo pipefail
cd "$(dirname "$0")/.."
CBINDGEN_VERSION=0.29.4
bin="${CARGO_HOME:-$HOME/.cargo}/bin/cbindgen"
if ! [ -x "$bin" ] || [ "$("$bin" --version)" != "cbindgen $CBINDGEN_VERSION" ]; then
  echo "installing cbindgen $CBINDGEN_VERSION"
  cargo install cbindgen --version "=$CBINDGEN_VERSION" --locked
fi
tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
"$bin" --quiet --config cbindgen.toml --output "$tmp" src/capi/mod.rs
if [ "${1:-}" = "--write" ]; then
  cp "$tmp" include/elra.h
  echo "wrote include/elra.h (cbindgen $CBINDGEN_VERSION)"
  exit 0
fi
if ! diff -u include/elra.h "$tmp"; then
  echo "include/elra.h is out of date with src/capi/: run scripts/check-header.sh --write" >&2
  exit 1
fi
echo "include/elra.h is up to date (cbindgen $CBINDGEN_VERSION)"
