#!/usr/bin/env bash
# Builds the cdylib and runs the PyTorch integration tests (python/tests/test_torch.py) and the
# exchange of adapter files with PEFT (python/tests/test_peft_interop.py) in a
# cached virtual environment with pinned torch, peft and scikit-learn. The PyPI torch wheel
# brings several GB of CUDA libraries: the environment is created once per machine
# (ELRA_TORCH_VENV, default ~/.cache/elra-torch-venv) and reused. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --lib
venv="${ELRA_TORCH_VENV:-$HOME/.cache/elra-torch-venv}"
pins=("torch==2.15.0" "peft==0.21.2" "scikit-learn==1.9.1" "numpy==2.4.6" "scipy==1.17.1" "pytest==9.2.0")
if ! [ -x "$venv/bin/python" ] || ! "$venv/bin/python" - "${pins[@]}" <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        got = version(name)
    except PackageNotFoundError:
        sys.exit(1)
    if got.split("+")[0] != want:
        sys.exit(1)
PY
then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
fi
export ELRA_LIB="${ELRA_LIB:-$PWD/target/release/libelra.so}"
cd python
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_torch.py tests/test_peft_interop.py tests/test_signatures.py tests/test_torch_cuda_ops.py -rs "$@"
