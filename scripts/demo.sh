#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the demo: a real Asterisk, the daemon, a SIPp
# caller greeted with real speech and transferred through a SIP trunk to a SIPp "agent".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m bridge.lab.demo
