#!/usr/bin/env bash
# The main job: set up the environment (Python packages, the Fashion-MNIST Debian package), then
# DTM pre-training of a small ViT on Fashion-MNIST with the offline EfficientNet-Lite0 teacher on the
# CPU (about 6 minutes of pre-training on 2 cores, 4 of evaluation), its evaluation (k-NN and linear probe on the test split), then a
# picture of token morphing on real photos.
# Outputs go to outputs/ (or $TOKENMORPH_OUT); rerunning resumes an interrupted run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
out="${TOKENMORPH_OUT:-outputs}"
mkdir -p "$out"
# pre-training (resumed if interrupted), then k-NN and linear probe on Fashion-MNIST's test split
.venv/bin/tokenmorph compare --configs demo --output-dir "$out" "$@"
.venv/bin/tokenmorph viz morph --out "$out/morph_gallery.png"
echo "[demo] done: run folder $out/demo (checkpoints/, metrics.jsonl, loss_curve.png, summary.json),"
echo "       evaluation table $out/compare.md, $out/morph_gallery.png"
