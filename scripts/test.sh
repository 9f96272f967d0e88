#!/usr/bin/env bash
# Run the whole test matrix (every nox session) from a fresh machine with only python3.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .ci-venv
.ci-venv/bin/python -m pip install -q --upgrade pip
.ci-venv/bin/python -m pip install -q nox uv   # uv: fast installs in every session (noxfile.py)
exec .ci-venv/bin/python -m nox "$@"
