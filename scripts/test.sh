#!/usr/bin/env bash
# Set up a virtual environment (torch pinned to the CPU wheel) and run lint, types and the tests.
# Without arguments (the whole suite) it also runs the version-sensitive tests (marked `compat`, pyproject.toml),
# again in .venv-compat-<name>, one environment per .ci/constraints-<name>.txt, pinned to the lowest supported
# releases (the main environment has the newest). BTCKPT_COMPAT=0 skips that step, BTCKPT_COMPAT=1 forces it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BTCKPT_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# Installs go through uv when it can be had (the same resolution as pip: pip's own find-links, indexes, constraint
# files and certificate are passed on; ~6x faster on a fresh machine, RESULTS.md "fifth pass"), else through pip.
# BTCKPT_PIP=1 forces pip. Either way the install is checked: a failed uv install falls back to pip.
UV=()
if [ "${BTCKPT_PIP:-0}" != 1 ] && "$VENV/bin/python" -m pip install -q uv >/dev/null 2>&1; then
  # pip's configuration (its files and PIP_* variables) as uv flags, one per line
  mapfile -t UV_ARGS < <("$VENV/bin/python" -m pip config list 2>/dev/null | python3 -c '
import os, shlex, sys
flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint", "cert": "--cert"}
for line in sys.stdin:
    key, _, value = line.strip().partition("=")
    key = key.rsplit(".", 1)[-1]
    for item in (shlex.split(value)[0].split() if value else []):
        if key in flags and (key in ("index-url", "extra-index-url") or os.path.exists(item)):
            print(flags[key]); print(item)')
  UV=(env)
  for ((i = 0; i < ${#UV_ARGS[@]}; i += 2)); do  # uv reads the certificate from SSL_CERT_FILE
    if [ "${UV_ARGS[i]}" = --cert ]; then UV+=("SSL_CERT_FILE=${UV_ARGS[i+1]}"); fi
  done
  UV+=("$VENV/bin/uv" pip install -q --index-strategy unsafe-best-match)
  for ((i = 0; i < ${#UV_ARGS[@]}; i += 2)); do
    if [ "${UV_ARGS[i]}" != --cert ]; then UV+=("${UV_ARGS[i]}" "${UV_ARGS[i+1]}"); fi
  done
fi
install() {  # install <python> <pip install arguments...>
  local py=$1; shift
  if [ ${#UV[@]} -gt 0 ]; then
    if "${UV[@]}" --python "$py" "$@"; then return 0; fi
    echo "== uv could not install ($*); installing with pip"
  fi
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q "$@"
}
install "$VENV/bin/python" -c .ci/constraints.txt -e ".[dev,deepspeed]"
COMPAT=${BTCKPT_COMPAT:-$([ $# -eq 0 ] && echo 1 || echo 0)}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}  # DeepSpeed's CPU accelerator (tests/test_hf_zero.py: ZeRO over gloo)
# No DeepSpeed JIT op is built: the ZeRO tests' config (tests/scripts/hf_train.py zero_config) asks for none.
RUN_TMP=$(mktemp -d)  # private (0700): the background compat run's log
trap 'rm -rf "$RUN_TMP"' EXIT
# The version-sensitive tests (-m compat) on the lowest supported versions: one environment per
# .ci/constraints-<name>.txt, built and run in the background beside the main suite; the output is printed after
# the main suite.
compat_suites() {
  for constraints in .ci/constraints-*.txt; do
    local name CV
    name=$(basename "$constraints" .txt)
    name=${name#constraints-}
    CV=".venv-compat-$name"
    [ -x "$CV/bin/python" ] || python3 -m venv "$CV"
    install "$CV/bin/python" -c "$constraints" -e . transformers accelerate lightning peft \
      pytest pytest-timeout psutil tqdm
    echo "== the version-sensitive tests (-m compat) on the $name supported versions ($CV, $constraints)"
    "$CV/bin/python" -c 'import torch, transformers, accelerate, lightning; print("versions: torch", torch.__version__,
      "transformers", transformers.__version__, "accelerate", accelerate.__version__, "lightning", lightning.__version__)'
    # all of tests/ is collected (modules needing what this venv lacks, e.g. hypothesis or deepspeed, skip)
    "$CV/bin/python" -m pytest -q -p no:cacheprovider -m compat tests/
  done
}
if [ "$COMPAT" = 1 ]; then
  COMPAT_LOG="$RUN_TMP/compat.log"
  compat_suites > "$COMPAT_LOG" 2>&1 &
  COMPAT_PID=$!
fi
# At exit a compat run cut short by a failure goes, then the folder.
# errexit holds in a trap too: every command here must succeed, or the rest is skipped and the run fails.
trap 'if [ -n "${COMPAT_PID:-}" ]; then pkill -P "$COMPAT_PID" 2>/dev/null || true; kill "$COMPAT_PID" 2>/dev/null || true; fi
      rm -rf "$RUN_TMP"' EXIT
"$VENV/bin/python" -m ruff check integrations/btckpt
"$VENV/bin/python" -m mypy integrations/btckpt
# Two workers (pytest-xdist): most tests wait on child processes, so two overlap well on 2 cores. worksteal hands
# each worker a contiguous half (module fixtures run about once) and lets an idle one take tests from the other.
# BTCKPT_TEST_WORKERS=0 runs in one process.
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -n "${BTCKPT_TEST_WORKERS:-2}" --dist worksteal --durations=40 "$@"

if [ "$COMPAT" = 1 ]; then
  status=0
  wait "$COMPAT_PID" || status=$?
  grep -v "^WARNING: Location" "$COMPAT_LOG" || true
  if [ "$status" != 0 ]; then echo "== the lowest-versions run failed (status $status)"; exit "$status"; fi
fi
