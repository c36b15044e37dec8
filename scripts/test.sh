#!/usr/bin/env bash
# Set up a virtual environment (torch pinned to the CPU wheel) and run lint, types and the tests.
# Without arguments (the whole suite) it then runs the version-sensitive tests (marked `compat`, pyproject.toml)
# again in .venv-compat-<name>, one environment per .ci/constraints-<name>.txt, pinned to the lowest supported
# releases (the main environment has the newest). BTCKPT_COMPAT=0 skips that step, BTCKPT_COMPAT=1 forces it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BTCKPT_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -c .ci/constraints.txt -e ".[dev,deepspeed]"
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}  # DeepSpeed's CPU accelerator (tests/test_hf_zero.py: ZeRO over gloo)
"$VENV/bin/python" -m ruff check integrations/btckpt
"$VENV/bin/python" -m mypy integrations/btckpt
# Two workers (pytest-xdist): most tests wait on child processes, so two overlap well on 2 cores. worksteal hands
# each worker a contiguous half (module fixtures run about once) and lets an idle one take tests from the other.
# BTCKPT_TEST_WORKERS=0 runs in one process.
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -n "${BTCKPT_TEST_WORKERS:-2}" --dist worksteal --durations=40 "$@"

if [ "${BTCKPT_COMPAT:-$([ $# -eq 0 ] && echo 1 || echo 0)}" = 1 ]; then
  for constraints in .ci/constraints-*.txt; do
    name=$(basename "$constraints" .txt)
    name=${name#constraints-}
    CV=".venv-compat-$name"
    echo "== the version-sensitive tests (-m compat) on the $name supported versions ($CV, $constraints)"
    [ -x "$CV/bin/python" ] || python3 -m venv "$CV"
    "$CV/bin/python" -m pip install -q -c "$constraints" -e . transformers accelerate lightning peft \
      pytest pytest-timeout psutil tqdm
    "$CV/bin/python" -c 'import torch, transformers, accelerate, lightning; print("versions: torch", torch.__version__,
      "transformers", transformers.__version__, "accelerate", accelerate.__version__, "lightning", lightning.__version__)'
    # all of tests/ is collected (modules needing what this venv lacks, e.g. hypothesis or deepspeed, skip)
    "$CV/bin/python" -m pytest -q -p no:cacheprovider -m compat tests/
  done
fi
