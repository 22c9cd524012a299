#!/usr/bin/env bash
# The GPU benchmark (issue 16), under 10 minutes on one H100-class GPU: the DTM step of a ViT-B/16
# student with a CLIP ViT-B/16 teacher at batch 128 in bf16 (images/s, per-phase time and FLOPs,
# MFU against the measured matmul peak and the data sheet's, the morph + loss share of the step,
# the release's fp16 step for the ratio), the same step with torch.compile, the MAE framework's
# step (ViT-B encoder, pixel targets) and with two or more GPUs a 2-process NCCL run against one
# process (same global batch: the weights agree within float tolerance).
#
# Each section prints one JSON object on stdout; progress goes to stderr. From anywhere:
#   bash scripts/bench-gpu.sh > bench-gpu.jsonl
# Environment: PYTHON (default .venv/bin/python, else python), OUT_DIR (run folders; default a
# temporary folder), STEPS (timed steps per benchmark, default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
OUT=${OUT_DIR:-$(mktemp -d -t tokenmorph-bench-gpu.XXXXXX)}
STEPS=${STEPS:-10}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
say() { echo "== $*" >&2; }
tm() { timeout "${LIMIT:-240}" "$PY" -m tokenmorph "$@"; }
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'"
VITB="--model base --teacher clip-vit-b16 --random-init --device cuda --precision bf16"

say "DTM step: ViT-B/16 student + CLIP ViT-B/16 teacher, batch 128, bf16, with the release's step"
# shellcheck disable=SC2086  # VITB is several words
tm bench pretrain $VITB --batch-size 128 --steps "$STEPS" --json
say "the same step, torch.compile (the first step, with the compilation, reported apart)"
# shellcheck disable=SC2086
LIMIT=400 tm bench pretrain $VITB --batch-size 128 --steps "$STEPS" --compile --no-baseline --json
say "MAE framework step (ViT-B/16 encoder, release decoder, pixel targets) beside the BEiT one"
tm bench pretrain --framework beit,mae --objective mask --model base --teacher pixels \
  --random-init --device cuda --precision bf16 --batch-size 128 --steps "$STEPS" --json

GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -ge 2 ]; then
  say "NCCL: 2 processes against 1, the same 4 global batches of 32 photos"
  DATA="$OUT/photos"
  "$PY" -c "
import pathlib, sys
from tests.conftest import make_photo_dir
p = pathlib.Path(sys.argv[1]); p.mkdir(parents=True, exist_ok=True)
if not any(p.iterdir()): make_photo_dir(p)
" "$DATA"
  common=(--config smoke --device cuda --data "$DATA" --max-steps 4 batch_size=32 num_workers=2)
  tm pretrain "${common[@]}" --output-dir "$OUT/one" > /dev/null
  timeout 300 "$PY" -m torch.distributed.run --nproc_per_node 2 -m tokenmorph pretrain \
    "${common[@]}" --output-dir "$OUT/two" > /dev/null
  "$PY" - "$OUT/one" "$OUT/two" <<'EOF'
import json, sys
from tokenmorph.runtime.checkpoints import find_checkpoints, load_checkpoint
one, two = (load_checkpoint(find_checkpoints(p)[-1])["model"] for p in sys.argv[1:3])
diff = max((one[k].float() - two[k].float()).abs().max().item() for k in one)
scale = max(one[k].float().abs().max().item() for k in one)
print(json.dumps({"check": "nccl_ddp_equality", "processes": [1, 2], "steps": 4,
                  "max_abs_weight_diff": diff, "max_abs_weight": scale}))
EOF
else
  say "one GPU: the NCCL comparison needs two (left out)"
fi
say "done; run folders in $OUT"
