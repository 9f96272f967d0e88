#!/usr/bin/env bash
# Run the demo (fine-tunes LoRA and bottleneck adapters on all-MiniLM-L6-v2) from a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .ci-venv
.ci-venv/bin/python -m pip install -q --upgrade pip
.ci-venv/bin/python -m pip install -q nox uv   # uv: fast installs in every session (noxfile.py)
exec .ci-venv/bin/python -m nox -s demo -- "$@"
