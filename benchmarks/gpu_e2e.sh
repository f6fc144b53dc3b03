#!/usr/bin/env bash
# End-to-end training throughput on a GPU machine (docs/benchmarks.md, "Training"): the real
# `staralign train` on synthetic 256 px JPEGs, with the maps built in the workers, mixed
# (edge maps in the workers, point maps on the GPU, 8-bit crops) or all on the GPU, after the
# GPU-only tests and the synthetic training step.  One JSON line per measurement in $OUT/bench.jsonl.
#
#   OUT=/tmp/e2e bash benchmarks/gpu_e2e.sh
#   SMALL=1 DEVICE=cpu OUT=/tmp/e2e bash benchmarks/gpu_e2e.sh     # a quick dry run
set -u
OUT=${OUT:-/tmp/staralign-e2e}; DEVICE=${DEVICE:-cuda}; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SA="python3 -m staralign"; LOG="$OUT/bench.jsonl"
if [ "${SMALL:-0}" = 1 ]; then B=4; N=32; WK=2; EXTRA='model: {nstack: 1, nlevels: 2, channels: 32, input_size: 64}'
else B=32; N=2048; WK=14; EXTRA=''; fi
j() { echo "== $1 $(date +%T)" >> "$OUT/suite.log"; local name=$1; shift
  "$@" 2>>"$OUT/suite.log" | tail -n 1 | sed "s/^{/{\"name\": \"$name\", /" | tee -a "$LOG" | cut -c1-300; }
if [ "${SMALL:-0}" = 1 ]; then M="--nstack 1 --nlevels 2 --channels 32 --input-size 64 --iters 2 --repeats 1"; DI="--images 8 --size 128"
else M="--iters 10 --repeats 3"; DI="--images 64"; fi
echo "== GPU-only tests $(date +%T)" >> "$OUT/suite.log"
if [ "$DEVICE" = cuda ]; then
  timeout 90 python3 -m pytest -q -rA -p no:cacheprovider tests/test_model_speed.py -k cuda > "$OUT/pytest_cuda.txt" 2>&1
fi
j step_fp32 $SA bench train --device $DEVICE --batch-size $B $M --targets none --cudnn-benchmark --json
echo "== synth $(date +%T)" >> "$OUT/suite.log"
$SA data synth --out "$OUT/synth" --train $N --test 64 --size 256 --workers $WK --quiet 2>>"$OUT/suite.log"
e2e() {  # e2e NAME TARGETS UINT8 [extra runtime yaml]
  local name=$1 targets=$2 u8=$3 rt=${4:-}
  echo "== $name $(date +%T)" >> "$OUT/suite.log"
  printf 'optim: {epochs: 2, batch_size: %s}\ndata: {workers: %s, val_batch_size: 64, targets: %s, uint8_images: %s}\nruntime: {cudnn_benchmark: true, tensorboard: false, log_every: 50%s}\n%s\n' \
    $B $WK $targets $u8 "$rt" "$EXTRA" > "$OUT/$name.yaml"
  timeout 240 $SA train --preset paper --config "$OUT/$name.yaml" --data-definition WFLW --image-dir "$OUT/synth" \
    --annot-dir "$OUT/synth" --device $DEVICE --out "$OUT/$name" >> "$OUT/suite.log" 2>&1
  grep '"val"' "$OUT/$name/metrics.jsonl" | sed "s/^/{\"name\": \"$name\", \"record\": /; s/\$/}/" >> "$LOG"
  grep '"val"' "$OUT/$name/metrics.jsonl" | tail -n 1 | cut -c1-300
}
e2e worker_float worker false
e2e mixed_uint8 mixed true
e2e device_uint8 device true
e2e mixed_uint8_bf16_cl mixed true ', amp: bf16, channels_last: true'
j data $SA bench data --workers $WK $DI --batch-size $B --profile-samples 0 --device $DEVICE --json
echo "== end $(date +%T)" >> "$OUT/suite.log"
