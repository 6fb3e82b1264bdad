#!/usr/bin/env bash
# Builds the cdylib (`cargo build --release`), creates or reuses a virtual environment with
# NumPy, SciPy and pytest, and runs the Python client's test suite (python/tests/) against
# target/release/libelra.so. Extra arguments go to pytest.
# Environment: ELRA_PYTEST_VENV (default target/pytest-venv), ELRA_LIB (library to test; default
# the freshly built one).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --lib
venv="${ELRA_PYTEST_VENV:-target/pytest-venv}"
if ! [ -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import numpy, scipy, pytest' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "numpy==2.4.6" "scipy==1.17.1" "pytest==9.2.0"
fi
case "$(uname -s)" in
  Darwin) lib=target/release/libelra.dylib ;;
  *) lib=target/release/libelra.so ;;
esac
export ELRA_LIB="${ELRA_LIB:-$PWD/$lib}"
export PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider python/tests "$@"
