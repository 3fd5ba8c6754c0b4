#!/usr/bin/env bash
# Build the sdist and wheel with `python -m build`, install the wheel into a clean virtual environment (torch
# pinned first, as in .ci/run) and run .ci/wheel_smoke.py from outside the clone against it.
# Usage: .ci/wheel_smoke.sh [PYTHON]   (default python3; `build` must be importable by it)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$PYTHON" -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
wheel="$(ls "$work"/dist/mmer_cl-*.whl)"
echo "built $(basename "$wheel") and $(basename "$(ls "$work"/dist/mmer_cl-*.tar.gz)")"

"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --upgrade pip
"$work/venv/bin/python" -m pip install --quiet "torch==2.13.0"
"$work/venv/bin/python" -m pip install --quiet "$wheel"
mkdir "$work/smoke"
cp .ci/wheel_smoke.py "$work/smoke.py"
(cd "$work/smoke" && "$work/venv/bin/python" "$work/smoke.py" "$work/smoke")
