#!/usr/bin/env bash
# Set up a virtual environment (torch pinned to the CPU wheel) and run lint, types and the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BTCKPT_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -c .ci/constraints.txt -e ".[dev]"
"$VENV/bin/python" -m ruff check integrations/btckpt
"$VENV/bin/python" -m mypy integrations/btckpt
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
