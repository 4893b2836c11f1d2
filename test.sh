#!/usr/bin/env bash
# The tests, on a fresh machine: set up .venv, then pytest (slow real-model tests included).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
source scripts/bootstrap.sh
exec python -m pytest "$@"
