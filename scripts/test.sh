#!/usr/bin/env bash
# The test tiers, fastest first, so a red fast test fails CI in minutes (the README's test command; .ci/run calls it).
#   1. fast:    pytest -m "not slow and not real and not browser"
#   2. slow:    pytest -m slow      (whole-pipeline runs of many seconds)
#   3. real:    pytest -m real      (a real downloaded model; its tests skip with a reason when it is absent)
#   4. browser: pytest -m browser   (the web UI in a real browser)
# pytest exits 5 when a tier selects no test; that is fine for the later tiers (not for the fast one).
# Extra arguments go to every tier (e.g. ./scripts/test.sh -x).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST=(.venv/bin/python -m pytest -q)
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT

tier() {
  local name=$1 marks=$2 empty_ok=$3
  shift 3
  echo "== tier ${name}: pytest -m \"${marks}\"" >&2
  "${PYTEST[@]}" -m "${marks}" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 5 ] && [ "$empty_ok" = yes ]; then
    echo "== tier ${name}: no tests selected (ok)" >&2
    return 0
  fi
  return "$rc"
}

# One closing line over every tier (each tier's pytest summary counts only itself).
total() {
  local kind=$1
  grep -E "^=*.* in [0-9.]+s" "$LOG" | grep -oE "[0-9]+ ${kind}" | awk '{s+=$1} END {print s+0}'
}
summary() {
  echo "all tiers: $(total passed) passed, $(total failed) failed, $(total skipped) skipped"
}

tier fast "not slow and not real and not browser" no "$@" || { rc=$?; summary; exit $rc; }
tier slow "slow" yes "$@" || { rc=$?; summary; exit $rc; }
tier real "real" yes "$@" || { rc=$?; summary; exit $rc; }
tier browser "browser" yes "$@" || { rc=$?; summary; exit $rc; }
summary
