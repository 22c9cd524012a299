#!/usr/bin/env bash
# The main job: set up the environment, then morph the 16x16 patches of real photos (scikit-image's
# sample photos, raw patch pixels as token features) and save a picture of the groups at several
# schedules, plus the morphing benchmark. Outputs go to outputs/ (or $TOKENMORPH_OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
out="${TOKENMORPH_OUT:-outputs}"
mkdir -p "$out"
.venv/bin/tokenmorph viz morph --out "$out/morph_gallery.png"
.venv/bin/tokenmorph viz morph --features pixels --mode paper --out "$out/morph_gallery_paper_mode.png"
.venv/bin/tokenmorph bench morph --json | tee "$out/bench_morph.json"
echo "[demo] done: pictures and benchmark in $out/"
