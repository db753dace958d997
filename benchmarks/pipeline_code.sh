#!/usr/bin/env bash
# The NOT pipeline end to end through the CLI on the real SmolLM2-135M and CodeXGLUE Java/C# functions:
# extract -> train (standalone) -> sweep positions on validation -> recover at the best one -> evaluate on test.
# Every step's wall-clock goes to benchmarks/results/pipeline_code/times.tsv. Runs ~15 min on 2 CPU cores.
#   DATA=../shared/data bash benchmarks/pipeline_code.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}/codexglue-java-cs
OUT=${OUT:-benchmarks/results/pipeline_code}
NH=${NH:-.venv/bin/not-hub}
TRAIN_DOCS=${TRAIN_DOCS:-400}   # functions per language for training
EPOCHS=${EPOCHS:-2}
EVAL_DOCS=${EVAL_DOCS:-40}      # held-out functions scored per evaluation (the sweep runs one per position)
FROM=${FROM:-extract}           # resume the pipeline at a step: extract, train, sweep, recover, evaluate
LR=${LR:-3e-4}
mkdir -p "$OUT"
[ "$FROM" = extract ] && : > "$OUT/times.tsv"
COMMON=(--data "$DATA/train.java-cs.txt.java" "$DATA/train.java-cs.txt.cs"
        --validation-data "$DATA/valid.java-cs.txt.java" "$DATA/valid.java-cs.txt.cs"
        --test-data "$DATA/test.java-cs.txt.java" "$DATA/test.java-cs.txt.cs"
        --unit line --block-size 256)
step() {  # step NAME command...
  local name=$1; shift
  case "$name" in "$FROM"*) RUNNING=1 ;; esac
  [ -n "${RUNNING:-}" ] || { echo "skipping $name"; return 0; }
  local t0=$(date +%s.%N)
  "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "it/s\]\|s/it\]\|examples/s\]" || true
  printf '%s\t%.1f\n' "$name" "$(echo "$(date +%s.%N) - $t0" | bc)" >> "$OUT/times.tsv"
}
step extract $NH extract smollm2 --out "$OUT/organ-extracted"
step train $NH train "$OUT/organ-extracted" --donor smollm2 --out "$OUT/organ-trained" \
  --epochs "$EPOCHS" --lr "$LR" --batch-size 8 --limit-docs "$TRAIN_DOCS" --run-dir "$OUT/run-train" "${COMMON[@]}"
step sweep $NH sweep "$OUT/organ-trained" --recipient smollm2 --split validation --max-eval-docs "$EVAL_DOCS" \
  --out "$OUT/sweep_validation.json" --plot "$OUT/sweep_validation.png" --limit-docs "$TRAIN_DOCS" "${COMMON[@]}"
[ -n "${RUNNING:-}" ] || { echo "unknown FROM=$FROM"; exit 2; }
BEST=$(.venv/bin/python -c "import json;print(json.load(open('$OUT/sweep_validation.json'))['summary']['replace']['best_position'])")
echo "best validation position: $BEST" | tee "$OUT/best_position.txt"
step recover $NH recover "$OUT/organ-trained" --recipient smollm2 --position "$BEST" --radius 1 --epochs 1 \
  --lr "$LR" --batch-size 8 --limit-docs $((TRAIN_DOCS / 2)) --save-to "$OUT/recipient-recovered" \
  --organ-out "$OUT/organ-recovered" --run-dir "$OUT/run-recover" "${COMMON[@]}"
step evaluate_transplanted $NH evaluate smollm2 --organ "$OUT/organ-trained" --position "$BEST" --split test \
  --max-eval-docs $((EVAL_DOCS * 5)) --record --dataset-name "CodeXGLUE Java/C# (test)" --out "$OUT/eval_test_transplanted.json" \
  --limit-docs "$TRAIN_DOCS" "${COMMON[@]}"
step evaluate_recovered $NH evaluate "$OUT/recipient-recovered" --split test --max-eval-docs $((EVAL_DOCS * 5)) \
  --out "$OUT/eval_test_recovered.json" --limit-docs "$TRAIN_DOCS" "${COMMON[@]}"
rm -rf "$OUT/run-train" "$OUT/run-recover" "$OUT/recipient-recovered/model.safetensors"
cat "$OUT/times.tsv"
