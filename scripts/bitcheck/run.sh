#!/usr/bin/env bash
# Six short training runs whose every checkpoint tensor, sample picture and
# logged loss compare.sh holds bit for bit against another binary's: the
# check that a refactor changed no result (issue 15). CPU training is
# deterministic for a fixed binary, thread count and machine.
#
# usage: scripts/bitcheck/run.sh BIN CONFIGDIR OUT
#   BIN        a swiftbrush binary (copy target/release/swiftbrush aside first)
#   CONFIGDIR  that commit's toy.yaml and tiny.yaml (its configs/)
#   OUT        a new folder for the runs
# Then: scripts/bitcheck/compare.sh OUT_BEFORE OUT_AFTER
set -euo pipefail
BIN=$(realpath "$1"); CFG=$(realpath "$2"); OUT=$3
REPO=$(cd "$(dirname "$0")/../.." && pwd)
TINY_TEACHER=$REPO/target/fixtures/current/pipelines/sd1
rm -rf "$OUT"; mkdir -p "$OUT"; OUT=$(realpath "$OUT")
# The toy world's 54 captions, and a few for the tiny fixture.
for c in red green blue yellow magenta cyan; do for s in circle square triangle; do
  for b in white black gray; do echo "a $c $s on a $b background"; done; done; done > "$OUT/toy_captions.txt"
printf '%s\n' "a red circle on a white background" "a photo of a cat" "a lighthouse at dusk" \
  "the quick brown fox" "a bowl of fruit on a wooden table" > "$OUT/tiny_captions.txt"
export RUST_LOG=info OMP_NUM_THREADS=2
run() {
  local name=$1; shift; echo "== $name"
  "$BIN" train "$@" >"$OUT/$name.stdout" 2>"$OUT/$name.stderr" || { tail -20 "$OUT/$name.stderr"; exit 1; }
}
TOY=(--config "$CFG/toy.yaml" --teacher "$REPO/assets/toy-teacher" --captions "$OUT/toy_captions.txt" --max-steps 6 --checkpoint-every 3)
TINY=(--config "$CFG/tiny.yaml" --teacher "$TINY_TEACHER" --captions "$OUT/tiny_captions.txt")
run toy "${TOY[@]}" --run-dir "$OUT/toy"
run toy_micro "${TOY[@]}" --run-dir "$OUT/toy_micro" --micro-batch 5
run tiny "${TINY[@]}" --run-dir "$OUT/tiny" --max-steps 6
run tiny_resume_a "${TINY[@]}" --run-dir "$OUT/tiny_resume" --max-steps 4
run tiny_resume_b "${TINY[@]}" --run-dir "$OUT/tiny_resume" --max-steps 6
run tiny_w2 "${TINY[@]}" --run-dir "$OUT/tiny_w2" --max-steps 6 --workers 2
# Per-step losses as logged (values only).
for f in "$OUT"/*.stderr; do
  sed 's/\x1b\[[0-9;]*m//g' "$f" | grep -o 'step=[0-9]* loss_vsd=[^ ]* loss_lora=[^ ]*' > "${f%.stderr}.losses" || true
done
echo done
