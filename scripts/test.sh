#!/usr/bin/env bash
# Set up the environment, lint (ruff, line length 100), and run the test suite. Fast subset by default
# (what CI runs); TOKENMORPH_FULL_TESTS=1 also runs the tests marked slow. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
.venv/bin/ruff check tokenmorph tests
.venv/bin/ruff format --check --quiet tokenmorph tests || {
    echo "[test] ruff format would change the files above: run .venv/bin/ruff format tokenmorph tests"; exit 1; }
marker=(-m "not slow")
if [ "${TOKENMORPH_FULL_TESTS:-0}" = "1" ]; then marker=(); fi
exec .venv/bin/python -m pytest "${marker[@]}" "$@"
