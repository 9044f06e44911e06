#!/usr/bin/env bash
# The whole test suite, set-up included: what CI runs (.ci/run) and what a newcomer runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check bridge tests bench
.venv/bin/mypy  # strict, on bridge/ (configuration in pyproject.toml)
.venv/bin/python -m pytest -q "$@"
