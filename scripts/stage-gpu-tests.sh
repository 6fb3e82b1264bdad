#!/usr/bin/env bash
# Stages the Rust CUDA tests for the device machine, which has no Rust toolchain: builds the test
# binaries of tests/cuda_phi1.rs, tests/cuda_layer.rs, tests/cuda_ops.rs and
# tests/cuda_ops_args.rs with `--features cuda` (each embeds the kernel fatbin) and copies them,
# debug information stripped (≈ 8 MB each), with run.sh into .gpu/tests/ (git-ignored; carry
# `.gpu` to the device). On the device, from the repository root, in one call:
#   bash .gpu/tests/run.sh
# run.sh runs every binary and exits non-zero when any test fails; a test that finds no device
# prints `skipping: <reason>` (shown: the binaries run with --nocapture; a run that shows such
# lines did not test the GPU).
# NVCC must point at nvcc (see build.rs), e.g.
#   export NVCC=$(ls ~/.cache/nvcc-13.0/lib/python3*/site-packages/nvidia/cu13/bin/nvcc)
set -euo pipefail
cd "$(dirname "$0")/.."
tests=(cuda_phi1 cuda_layer cuda_ops cuda_ops_args)
args=()
for t in "${tests[@]}"; do args+=(--test "$t"); done
out=.gpu/tests
rm -rf "$out"
mkdir -p "$out"
cargo test --release --features cuda "${args[@]}" --no-run --message-format=json \
  | python3 -c '
import json, sys
want = set(sys.argv[1:])
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and m["target"]["name"] in want and "test" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])
' "${tests[@]}" | while read -r name exe; do
  cp "$exe" "$out/$name"
  if command -v strip >/dev/null; then strip --strip-debug "$out/$name"; fi
done
for t in "${tests[@]}"; do
  [ -x "$out/$t" ] || { echo "stage-gpu-tests: no binary for $t" >&2; exit 1; }
done
cat >"$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the CUDA test binaries staged by scripts/stage-gpu-tests.sh; non-zero exit if any fails.
cd "$(dirname "$0")"
status=0
for t in cuda_phi1 cuda_layer cuda_ops cuda_ops_args; do
  echo "== $t"
  ./"$t" --test-threads=1 --nocapture || status=1
done
echo "== overall: $([ "$status" = 0 ] && echo PASS || echo FAIL)"
exit "$status"
RUN
chmod +x "$out/run.sh"
echo "staged $out: $(du -sh "$out" | cut -f1)"
echo "device: bash $out/run.sh   (carry .gpu)"
