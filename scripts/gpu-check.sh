#!/usr/bin/env bash
# Prepares the ONE device call that checks and times the GPU code (issue 30): builds here with the
# pinned nvcc, stages into .gpu/ (git-ignored; carry `.gpu` to the device) a compressed payload
# and .gpu/check.sh, which on the device, in ≤ 8 minutes:
#   1. prints the card (nvidia-smi),
#   2. runs every CUDA test binary (scripts/stage-gpu-tests.sh: cuda_phi1, cuda_layer, cuda_ops,
#      cuda_ops_args),
#   3. runs compute-sanitizer memcheck over the functional-ops parity tests (the newest kernels'
#      launch plans),
#   4. runs the φ1 batch bench and the layer bench (all shapes, base / LoRA / ELRA routes),
#   5. runs scripts/bench_torch.py (PyTorch and PEFT LoRA on the same shapes, same session),
#   6. times one elra.torch training step against PEFT LoRA and a hand-written torch ELRA
#      (python/examples/bench_step.py --device cuda, bf16, 8192×4096²),
#   7. times the multi-adapter forward (python/examples/bench_multi.py --device cuda, bf16,
#      N = d = k = 4096, r = 16, 1/8/64 adapters: grouped vs a loop of single-adapter calls vs base),
#   8. runs the Python GPU tests (python/tests/test_torch_gpu.py: the handle; test_torch_cuda_ops.py:
#      elra.torch on CUDA tensors) and checks the ctypes declarations against include/elra.h
#      (python/tests/test_signatures.py),
# each under its own time limit (475 s in all), full logs in $OUT (or .gpu/out), and prints ONE
# summary table last ($OUT/summary.txt gets each row as its step ends). Device call (from the
# repository root, carry [".gpu"], timeout_s 540):
#   bash .gpu/check.sh
# Test it here first: `bash scripts/gpu-check.sh && bash .gpu/check.sh` — without a GPU every
# step reports that it skipped, and the table still prints.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${NVCC:-}" ] && ! command -v nvcc >/dev/null; then
  NVCC=$(ls "${NVCC_ENV:-$HOME/.cache/nvcc-13.0}"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -n1 || true)
  [ -n "$NVCC" ] || { echo "gpu-check: no nvcc (run .ci/run once, or set NVCC)" >&2; exit 1; }
  export NVCC
fi
# .gpu/ is git-ignored; start it afresh so nothing stale travels (the tool carries 64 MiB).
rm -rf .gpu
bash scripts/stage-gpu-tests.sh
# The two CUDA benches (criterion, harness = false), stripped.
mkdir -p .gpu/bench
cargo bench --features cuda --bench cuda_phi1_batch --bench cuda_layer --no-run --message-format=json \
  | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do
  cp "$exe" ".gpu/bench/$name"
  if command -v strip >/dev/null; then strip --strip-debug ".gpu/bench/$name"; fi
done
for b in cuda_phi1_batch cuda_layer; do
  [ -x ".gpu/bench/$b" ] || { echo "gpu-check: no bench binary $b" >&2; exit 1; }
done
# The Python client with the CUDA cdylib, its GPU tests, and the PyTorch/PEFT bench.
cargo build --release --features cuda --lib
rm -rf .gpu/py && mkdir -p .gpu/py/tests
cp target/release/libelra.so .gpu/py/
if command -v strip >/dev/null; then strip --strip-debug .gpu/py/libelra.so; fi
cp -r python/elra .gpu/py/
cp python/tests/test_torch_gpu.py python/tests/test_torch_cuda_ops.py python/tests/test_signatures.py \
   python/tests/conftest.py .gpu/py/tests/
rm -rf .gpu/include && mkdir -p .gpu/include && cp include/elra.h .gpu/include/
cp scripts/bench_torch.py .gpu/py/
mkdir -p .gpu/py/examples && cp python/examples/bench_step.py python/examples/bench_multi.py .gpu/py/examples/
find .gpu/py -name __pycache__ -type d -prune -exec rm -rf {} +

# One compressed payload (≈ 21 MB instead of ≈ 58: the device tool carries 64 MiB in all).
tar czf .gpu/payload.tgz -C .gpu tests bench py include
rm -rf .gpu/tests .gpu/bench .gpu/py .gpu/include

cat > .gpu/check.sh <<'CHECK'
#!/usr/bin/env bash
# The device call of scripts/gpu-check.sh: unpacks the payload next to this file into a scratch
# folder, runs every step under its own limit with logs in $OUT, prints one summary table last.
here=$(cd "$(dirname "$0")" && pwd) || exit 1
out=${OUT:-$here/out}
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/elra-gpu.XXXXXX") || exit 1
tar xzf "$here/payload.tgz" -C "$work" || { echo "check: cannot unpack $here/payload.tgz"; exit 1; }
cd "$work" || exit 1
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
rows=()
step() {  # step NAME LIMIT_S COMMAND...: runs it, logs to $out/NAME.log, records the result
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  local res=pass
  if [ "$rc" = 124 ]; then res="TIMEOUT"; elif [ "$rc" != 0 ]; then res="FAIL ($rc)"; fi
  if grep -qiE "^skipping|skipping:|skipped|no CUDA device|nothing measured|sees no CUDA" "$out/$name.log"; then
    res="$res, skips (see log)"
  fi
  rows+=("$(printf '%-22s %-26s %5ss  %s' "$name" "$res" "$((SECONDS - t0))" "$out/$name.log")")
  echo "${rows[-1]}" >> "$out/summary.txt"  # kept even if the call is cut off
  tail -n 3 "$out/$name.log"
}
: > "$out/summary.txt"
step card 10 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
step tests 100 bash tests/run.sh
if command -v compute-sanitizer >/dev/null; then
  step memcheck_ops 50 compute-sanitizer --tool memcheck --error-exitcode 3 tests/cuda_ops --test-threads=1
else
  rows+=("$(printf '%-22s %-26s' memcheck_ops 'not run: no compute-sanitizer')")
  echo "${rows[-1]}" >> "$out/summary.txt"
fi
step bench_phi1 40 bench/cuda_phi1_batch --bench --noplot --warm-up-time 1 --measurement-time 2
step bench_layer 115 bench/cuda_layer --bench --noplot --warm-up-time 1
step bench_torch 45 python3 py/bench_torch.py
step bench_step 30 env ELRA_LIB="$PWD/py/libelra.so" python3 py/examples/bench_step.py \
  --device cuda --dtype bfloat16 --d 4096 --k 4096 --n 8192 --r 8 --steps 10 --repeats 3
step bench_multi 35 env ELRA_LIB="$PWD/py/libelra.so" python3 py/examples/bench_multi.py \
  --device cuda --dtype bfloat16 --n 4096 --d 4096 --k 4096 --r 16 --repeats 5
step py_gpu 50 env ELRA_LIB="$PWD/py/libelra.so" PYTHONPATH="$PWD/py" \
  python3 -m pytest -q -rs -p no:cacheprovider py/tests/test_torch_gpu.py py/tests/test_torch_cuda_ops.py py/tests/test_signatures.py
echo
echo "== key lines"
grep -hE "time: |µs  .*× base|^N=|ratio|PEFT|peft_lora|torch_lora|base_fwd_bwd|elra.torch|hand-written|frozen layer" \
  "$out/bench_phi1.log" "$out/bench_layer.log" "$out/bench_torch.log" "$out/bench_step.log" 2>/dev/null | head -n 60
cat "$out/bench_multi.log" 2>/dev/null | tail -n 6
echo
echo "== summary (card: $(head -n 2 "$out/card.log" | tail -n 1))"
printf '%-22s %-26s %6s  %s\n' step result time log
for r in "${rows[@]}"; do echo "$r"; done
CHECK
chmod +x .gpu/check.sh
echo "staged .gpu: $(du -sh .gpu | cut -f1) (the device tool carries at most 64 MiB)"
echo "device call: bash .gpu/check.sh   (carry [\".gpu\"], timeout_s 540)"
