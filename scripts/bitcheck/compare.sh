#!/usr/bin/env bash
# compare.sh A B: every checkpoint tensor file, state.json (but its config
# fingerprint), sample PNG and logged loss of two run.sh outputs, bit for bit.
set -uo pipefail
A=$1; B=$2; bad=0; n=0
for run in toy toy_micro tiny tiny_resume tiny_w2; do
  for ck in "$A/$run"/checkpoints/step-*; do
    step=$(basename "$ck")
    fa=$(ls -d "$ck"/attempt-*)
    fb=$(ls -d "$B/$run/checkpoints/$step"/attempt-* 2>/dev/null) || { echo "MISSING $run/$step"; bad=1; continue; }
    for f in "$fa"/*.safetensors; do
      n=$((n+1)); cmp -s "$f" "$fb/$(basename "$f")" || { echo "DIFF $run/$step/$(basename "$f")"; bad=1; }
    done
    n=$((n+1))
    diff <(grep -v fingerprint "$fa/state.json") <(grep -v fingerprint "$fb/state.json") >/dev/null \
      || { echo "DIFF $run/$step/state.json"; bad=1; }
  done
  for p in "$A/$run"/samples/*.png; do
    [ -e "$p" ] || continue
    n=$((n+1)); cmp -s "$p" "$B/$run/samples/$(basename "$p")" || { echo "DIFF $run/samples/$(basename "$p")"; bad=1; }
  done
done
for l in "$A"/*.losses; do
  n=$((n+1)); [ -s "$l" ] || { echo "EMPTY $l"; bad=1; }
  cmp -s "$l" "$B/$(basename "$l")" || { echo "DIFF losses $(basename "$l")"; bad=1; }
done
echo "compared $n items; $([ $bad = 0 ] && echo 'ALL IDENTICAL' || echo 'DIFFERENCES FOUND')"
exit $bad
