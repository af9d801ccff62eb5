#!/usr/bin/env bash
# The second CI stack (issue 25): TensorFlow 2.14.1 + Keras 2.14, what Open-CE 1.11 ships
# for Bede's POWER9 nodes (tensorflow-cpu from PyPI stands in for it here).
#
#   bash tests/tf214.sh [pytest args ...]
#
# Builds a virtualenv ($TF214_VENV, default ~/.cache/hpcjobs/venv-tf214) from
# tests/requirements-tf214.txt, installs hpcjobs into it with --no-deps (no second
# TensorFlow), and runs the tests marked tf214 there. pip's wheel cache is shared with
# the main environment; a venv already built from the same requirements and pyproject is
# reused as it is (a stamp file holds their checksum), so a second run only tests.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TF214_VENV:-$HOME/.cache/hpcjobs/venv-tf214}"
PYTHON="${PYTHON:-python3}"
REQ="$REPO/tests/requirements-tf214.txt"
STAMP="$VENV/.hpcjobs-tf214-stamp"
want="$(cat "$REQ" "$REPO/pyproject.toml" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "tf214: building $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q -r "$REQ"
    "$VENV/bin/python" -m pip install -q --no-deps -e "$REPO"
    echo "$want" > "$STAMP"
fi
"$VENV/bin/python" - <<'EOF'
import keras, numpy, tensorflow as tf
assert tf.__version__ == "2.14.1" and keras.__version__.startswith("2.14"), (tf.__version__, keras.__version__)
print(f"tf214: TensorFlow {tf.__version__}, Keras {keras.__version__}, numpy {numpy.__version__}", flush=True)
EOF
cd "$REPO"
exec "$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider -n 3 --dist loadscope --no-loadscope-reorder -m "tf214 and not slurm" "$@"
