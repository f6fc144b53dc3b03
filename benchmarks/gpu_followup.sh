#!/usr/bin/env bash
# Follow-up GPU measurements (see docs/benchmarks.md): the STAR loss eager vs torch.compile,
# the training step with targets built by the loader (precomputed here) under each precision /
# memory format, and the real trainer end to end with worker-side targets.
set -u
OUT=${OUT:-/tmp/staralign-bench2}; DEVICE=${DEVICE:-cuda}; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SA="python3 -m staralign"; LOG="$OUT/bench.jsonl"
if [ "${SMALL:-0}" = 1 ]; then M="--nstack 1 --nlevels 2 --channels 32 --input-size 64"; B=4; IT="--iters 2 --repeats 1"; N=64; WK=2
else M=""; B=32; IT="--iters 10 --repeats 3"; N=2048; WK=14; fi
j() { "$@" 2>>"$OUT/suite.log" | tail -n 1 >> "$LOG"; echo "done: $*" >> "$OUT/suite.log"; }
j $SA bench loss --device $DEVICE --batch-size $B --no-baseline --json
j $SA bench loss --device $DEVICE --batch-size $B --no-baseline --compile --json
for opts in "" "--amp bf16" "--channels-last" "--amp bf16 --channels-last"; do
  j $SA bench train --device $DEVICE --batch-size $B $M $IT --targets worker --cudnn-benchmark $opts --json
done
$SA data synth --out "$OUT/synth" --train $N --test 64 --size 256 --workers $WK --quiet 2>>"$OUT/suite.log"
printf 'optim: {epochs: 2, batch_size: %s}\ndata: {workers: %s, val_batch_size: 64, targets: worker}\nruntime: {cudnn_benchmark: true, tensorboard: false, log_every: 50}\n' $B $WK > "$OUT/e2e.yaml"
[ "${SMALL:-0}" = 1 ] && printf 'model: {nstack: 1, nlevels: 2, channels: 32, input_size: 64}\n' >> "$OUT/e2e.yaml"
$SA train --preset paper --config "$OUT/e2e.yaml" --data-definition WFLW --image-dir "$OUT/synth" --annot-dir "$OUT/synth" \
  --device $DEVICE --out "$OUT/e2e" >> "$OUT/suite.log" 2>&1
grep '"val"' "$OUT/e2e/metrics.jsonl" | sed 's/^/{"name": "e2e_fp32_worker_targets", "record": /; s/$/}/' >> "$LOG"
