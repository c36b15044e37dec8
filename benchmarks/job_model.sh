#!/usr/bin/env bash
# The offline run of the job model (tests/test_job_model.py): at least $1 events (default 10000) with random
# seeds; every violation is printed with its seed (BTCKPT_MODEL_SEED=<seed> reruns it) and the summary line
# "job model: N events, E examples, R restarts, V violations, Ts" comes last. Run from the repository root:
#   benchmarks/job_model.sh 10000 2>&1 | tee job_model.log
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
BTCKPT_MODEL_EVENTS="${1:-10000}" exec "$PY" -m pytest -q -p no:cacheprovider -s tests/test_job_model.py
