#!/usr/bin/env bash
# tiny_doc's training from scratch, stage after stage (see the model card,
# bacon_sglang/models/tiny_doc/README.md). Usage: bash training/tiny_doc/train.sh OUT [FLAG ...]
# (from the repository root, with the project's virtual environment active). Stages 1-3 save
# OUT, stages 4 and 5 OUT/stage4 and OUT/stage5 (the shipped model), resumably
# (trainer_state.pt); a stopped stage is continued by running this script again with the same
# OUT and FLAGs. Stages 2-5 train with the cosine ink probe (PROBE below). FLAGs (train.py's,
# for experiments) are added to every stage; the shipped model was trained without any.
set -euo pipefail
OUT=${1:?usage: train.sh OUT [FLAG ...]}
shift
EXTRA="$*"
TRAIN="python -m training.train $OUT --task doc --layers 8 --small-batch 16
  --batch 8 --follow-ups 6 --lr 1e-3 --warmup 50 --seed 0 --threads 2 --eval-n 48
  --save-minutes 10 $EXTRA"
PROBE="--ink-loss 1 --ink-probe-scale 16"

steps_done() {  # steps_done DIR
  python -c "import json, sys; print(json.load(open(sys.argv[1]))['steps'])" \
    "$1/training.json" 2>/dev/null || echo 0
}
resume() { [ -f "$1/trainer_state.pt" ] && echo "--resume $1" || true; }

# Stage 1: one-line pages first (one coloured word), then 2 and 3 lines, 5 x 5 and 10 x 10.
if [ "$(steps_done "$OUT")" -lt 2400 ]; then
  $TRAIN $(resume "$OUT") --steps 6000 --small-grids 1x5,2x5,3x5,5,10 --small-fraction 0.4 \
    --eval-every 300 --log-every 10 --until 2400
fi
# Stage 2: without the one-line pages, small pages up to step 4200, then 16 x 16 pages; from here
# on the ink probe's loss is added (the probe is created on this resume).
if [ "$(steps_done "$OUT")" -lt 5100 ]; then
  $TRAIN $PROBE --resume "$OUT" --steps 6000 --small-grids 2x5,3x5,5,10 --small-fraction 0.7 \
    --eval-every 300 --log-every 7 --until 5100
fi
# Stage 3: 16 x 16 pages; the cosine schedule stretched from 6000 to 6800 steps (the
# learning rate at step 5100 goes from 1.0e-4 to 1.9e-4), stopped at step 6,500 (where the
# shipped run stopped; the learning rate there is 4.9e-6).
if [ "$(steps_done "$OUT")" -lt 6500 ]; then
  $TRAIN $PROBE --resume "$OUT" --steps 6800 --small-grids 2x5,3x5,5,10 --small-fraction 0.6 \
    --eval-every 500 --log-every 7 --until 6500
fi
# Stage 4: a new run from stage 3's saved (bf16) weights, fresh optimiser and schedule (lr 3e-4,
# 20 warm-up steps, cosine over 3,000 steps), 16 x 16 pages only, train pages from index 88,000
# (the 6,500 steps above used 0-85,599).
FINE="python -m training.train --task doc --layers 8 --small-fraction 0 --batch 8
  --follow-ups 6 --warmup 20 --seed 0 --threads 2 --eval-n 96 --save-minutes 10 --log-every 10
  $PROBE $EXTRA"
if [ "$(steps_done "$OUT/stage4")" -lt 3000 ]; then
  $FINE "$OUT/stage4" $(resume "$OUT/stage4") --init "$OUT" --offset 88000 --steps 3000 \
    --lr 3e-4 --eval-every 500
fi
# Stage 5: the same from stage 4's weights, lr 1.5e-4 over 1,200 steps, pages from 112,000.
if [ "$(steps_done "$OUT/stage5")" -lt 1200 ]; then
  $FINE "$OUT/stage5" $(resume "$OUT/stage5") --init "$OUT/stage4" --offset 112000 \
    --steps 1200 --lr 1.5e-4 --eval-every 600
fi
