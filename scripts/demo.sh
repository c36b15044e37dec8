#!/usr/bin/env bash
# Set up (virtual environment, torch pinned to the CPU wheel) and run the kill-and-resume demo.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BTCKPT_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -c .ci/constraints.txt -e .
"$VENV/bin/python" examples/demo.py
