#!/usr/bin/env bash
# The one prepared GPU run that makes the shipped default model (models/default), run through the
# device tool on a lent H100/H200 from the repository root: synthetic data -> NSFP pseudo-labels (GPU,
# batched) -> FastFlow3D student (GPU) -> teacher and student scored on the synthetic val split.
# Every phase is time-boxed (label and train are resumable/checkpointed, so a cut phase still leaves
# usable output). Needs no network and no pip install: the image's python3 (torch+CUDA, numpy,
# scipy, pyarrow, pandas, pyyaml, tqdm) is enough. TOTAL_S bounds the whole run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_train_out}; mkdir -p "$OUT"
TOTAL_S=${TOTAL_S:-420}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
SHIM=$(mktemp -d); ln -s "$PWD/training" "$SHIM/zeroflow_training"
export PYTHONPATH="$PWD:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
ZF="python3 -m zeroflow_ros.cli"
D=/tmp/zf_data
t0=$(date +%s); left() { echo $(( TOTAL_S - ($(date +%s) - t0) )); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
SEQ=${SEQ:-48}; SWEEPS=${SWEEPS:-12}; VAL=${VAL:-4}
echo "== synth $SEQ x $SWEEPS train + $VAL val"; s=$(date +%s)
timeout 90 $ZF data synth $D --sequences "$SEQ" --sweeps "$SWEEPS" --split-val "$VAL" --workers 16 --seed 0 2>&1 | tail -3
echo "synth_s=$(( $(date +%s) - s ))" | tee -a "$OUT/phases.txt"

# Teacher on val first (small, for the teacher row), then train labels until the label budget ends.
s=$(date +%s)
timeout 120 $ZF label $D --split val --out $D/labels_val --device "${DEV:-cuda}" --batch-pairs 8 --workers 1 --no-progress 2>&1 | tail -3
echo "label_val_s=$(( $(date +%s) - s ))" | tee -a "$OUT/phases.txt"
LB=$(( $(left) * 45 / 100 )); [ "$LB" -lt 60 ] && LB=60; s=$(date +%s)
timeout "$LB" $ZF label $D --split train --out $D/labels --device "${DEV:-cuda}" --batch-pairs 16 --workers 3 --no-progress 2>&1 | tail -3
echo "label_train_s=$(( $(date +%s) - s )) pairs=$(grep -c '"ok"' $D/labels/manifest.jsonl)" | tee -a "$OUT/phases.txt"
cp $D/labels/manifest.jsonl "$OUT/label_manifest.jsonl" 2>/dev/null

TB=$(( $(left) - 75 )); [ "$TB" -lt 30 ] && TB=30; s=$(date +%s)
timeout -s INT "$TB" $ZF train --labels $D/labels --data $D --config cpu_small --device "${DEV:-cuda}" --out $D/run \
  --val-split none --no-progress ${TRAIN_SET:-} 2>&1 | tail -8
echo "train_s=$(( $(date +%s) - s ))" | tee -a "$OUT/phases.txt"
cp $D/run/last.pt $D/run/metrics.csv $D/run/*.yaml "$OUT/" 2>/dev/null
[ -f $D/run/model.pt ] && cp $D/run/model.pt "$OUT/"

s=$(date +%s)
timeout 40 $ZF eval $D/labels_val $D --split val --out "$OUT/eval_teacher" 2>&1 | grep -E "3-Way|Dynamic|wrote" | head -5
CK=$D/run/last.pt; [ -f $D/run/model.pt ] && CK=$D/run/model.pt
timeout 30 $ZF predict $D --split val --method student --model "$CK" --backend torch --device "${DEV:-cuda}" --out $D/pred_student 2>&1 | tail -2
timeout 20 $ZF eval $D/pred_student $D --split val --out "$OUT/eval_student" 2>&1 | grep -E "3-Way|wrote" | head -3
echo "eval_s=$(( $(date +%s) - s )) total_s=$(( $(date +%s) - t0 ))" | tee -a "$OUT/phases.txt"
ls -la "$OUT"
