#!/usr/bin/env bash
# Create .venv with everything tuneforge and its tests need. Idempotent.
# torch is installed first and pinned so that no version range can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q torch==2.13.0
# constraints.txt pins every transitive dependency to the versions CI was green with.
.venv/bin/python -m pip install -q -c constraints.txt -e ".[quant,serve,dev,search,ui]"
# Browser tests (marker `browser`, tests/test_ui_browser.py) drive Debian's Chromium through Playwright; Playwright's
# own browser download does not work offline, so the system binary is used. Without root the tests skip, saying why.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -q && apt-get install -y -q chromium; } >/dev/null \
      || echo "setup: apt-get install chromium failed; the browser tests will be skipped" >&2
  else
    echo "setup: chromium is missing (as root: apt-get install chromium); the browser tests will be skipped" >&2
  fi
fi
# DeepSpeed for distributed.strategy: deepspeed (extra `distributed`): ~1 min to build from its sdist; optional, so a
# failed build leaves the rest of the environment working (the strategy then names the extra, its test is skipped).
.venv/bin/python -m pip install -q -c constraints.txt -e ".[distributed]" \
  || echo "setup: deepspeed (extra 'distributed') not installed; distributed.strategy deepspeed is unavailable" >&2
