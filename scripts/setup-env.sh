#!/usr/bin/env bash
# Create .venv (if missing) and install tokenmorph with its test and picture extras into it.
# Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "tokenmorph needs Python >= 3.10, found " + sys.version.split()[0])'
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $("$PY" --version)"
    "$PY" -m venv .venv
fi
# Fashion-MNIST (the demo's data) ships as a Debian package; elsewhere tokenmorph can download it.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "[setup] installing the Fashion-MNIST data set (Debian package dataset-fashion-mnist)"
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null \
            || echo "[setup] warning: could not install dataset-fashion-mnist; the demo needs Fashion-MNIST (see README)"
    else
        echo "[setup] note: Fashion-MNIST not found; install the Debian package dataset-fashion-mnist, or set TOKENMORPH_DATA"
    fi
fi
stamp=.venv/.tokenmorph-install-stamp
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "[setup] installing tokenmorph[dev] and its dependencies (torch, torchvision, timm; first time: a few minutes)"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[dev]"
    echo "$want" > "$stamp"
fi
