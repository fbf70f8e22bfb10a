#!/usr/bin/env bash
# Create ./.venv and install s2v-batch into it (idempotent: a stamp skips work already done).
#   scripts/bootstrap.sh          the product (runs the example batch on the preview backend)
#   scripts/bootstrap.sh dev      + the model stack (torch, transformers, diffusers, ray), faster-whisper
#                                 and the test tools,
#                                 + Debian tools the tests use: espeak-ng and ffprobe for fixtures,
#                                   chromium and chromedriver for the Prefect UI test
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-base}"

python="${PYTHON:-}"
if [ -z "$python" ]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      python="$candidate"; break
    fi
  done
fi
[ -n "$python" ] || { echo "bootstrap: Python 3.11 or 3.12 is required" >&2; exit 2; }

if [ "$mode" = "dev" ]; then
  missing=()
  command -v espeak-ng >/dev/null || missing+=(espeak-ng)
  command -v ffprobe >/dev/null || missing+=(ffmpeg)
  command -v chromium >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "bootstrap: installing test tools: ${missing[*]}"
      apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
      echo "bootstrap: the tests need these system packages: ${missing[*]} (e.g. sudo apt-get install ${missing[*]})" >&2
      exit 2
    fi
  fi
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
extras=""
[ "$mode" = "dev" ] && extras="[model,whisper,dev]"
stamp=".venv/.s2v-installed-$mode"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing s2v-batch$extras into .venv (first time takes a few minutes)"
  # Some registries' mirrors print a warning per package; keep real errors visible.
  .venv/bin/python -m pip install -q --upgrade pip 2> >(grep -v "WARNING: Location" >&2)
  .venv/bin/python -m pip install -q -c constraints.txt -e ".$extras" 2> >(grep -v "WARNING: Location" >&2)
  echo "$want" > "$stamp"
fi
