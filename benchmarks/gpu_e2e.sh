#!/usr/bin/env bash
# Training throughput on a GPU machine (docs/benchmarks.md, "Training"): the GPU-only tests,
# the trainer's step on synthetic tensors (eager, and captured as one CUDA graph, in fp32 and
# bf16 with and without channels-last), a profile of the eager step (wall time against kernel
# time), then the real `staralign train` end to end on synthetic 256 px JPEGs: eager, and
# with --cuda-graphs.  One JSON line per measurement in $OUT/bench.jsonl.
#
#   OUT=/tmp/e2e bash benchmarks/gpu_e2e.sh
#   SMALL=1 DEVICE=cpu OUT=/tmp/e2e bash benchmarks/gpu_e2e.sh     # a quick dry run (graph rows fail on a CPU)
set -u
OUT=${OUT:-/tmp/staralign-e2e}; DEVICE=${DEVICE:-cuda}; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SA="python3 -m staralign"; LOG="$OUT/bench.jsonl"
if [ "${SMALL:-0}" = 1 ]; then B=4; N=32; WK=2; EXTRA='model: {nstack: 1, nlevels: 2, channels: 32, input_size: 64}'
  M="--nstack 1 --nlevels 2 --channels 32 --input-size 64 --iters 2 --repeats 1"
else B=32; N=4096; WK=14; EXTRA=''; M="--iters 10 --repeats 3"; fi
j() { echo "== $1 $(date +%T)" >> "$OUT/suite.log"; local name=$1; shift
  timeout 150 "$@" 2>>"$OUT/suite.log" | tail -n 1 | sed "s/^{/{\"name\": \"$name\", /" | tee -a "$LOG" | cut -c1-300; }
echo "== GPU-only tests $(date +%T)" >> "$OUT/suite.log"
if [ "$DEVICE" = cuda ]; then
  timeout 150 python3 -m pytest -q -rA -p no:cacheprovider tests/test_graphed_step.py tests/test_engine.py tests/test_model_speed.py \
    -k cuda > "$OUT/pytest_cuda.txt" 2>&1; tail -n 3 "$OUT/pytest_cuda.txt"
fi
T="bench train --device $DEVICE --batch-size $B $M --targets worker --cudnn-benchmark --json"
j step_fp32 $SA $T
j step_fp32_graph $SA $T --cuda-graphs
j step_bf16_cl_graph $SA $T --cuda-graphs --amp bf16 --channels-last
j step_bf16_graph $SA $T --cuda-graphs --amp bf16
j step_fp32_cl_graph $SA $T --cuda-graphs --channels-last
j profile_fp32 $SA $T --profile
echo "== synth $(date +%T)" >> "$OUT/suite.log"
$SA data synth --out "$OUT/synth" --train $N --test 64 --size 256 --workers $WK --quiet 2>>"$OUT/suite.log"
e2e() {  # e2e NAME [extra runtime yaml]
  local name=$1 rt=${2:-}
  echo "== $name $(date +%T)" >> "$OUT/suite.log"
  printf 'optim: {epochs: 2, batch_size: %s}\ndata: {workers: %s, val_batch_size: 64, targets: mixed, uint8_images: true}\nruntime: {cudnn_benchmark: true, tensorboard: false, log_every: 50%s}\n%s\n' \
    $B $WK "$rt" "$EXTRA" > "$OUT/$name.yaml"
  timeout 200 $SA train --preset paper --config "$OUT/$name.yaml" --data-definition WFLW --image-dir "$OUT/synth" \
    --annot-dir "$OUT/synth" --device $DEVICE --out "$OUT/$name" >> "$OUT/suite.log" 2>&1
  grep -s '"val"' "$OUT/$name/metrics.jsonl" | sed "s/^/{\"name\": \"$name\", \"record\": /; s/\$/}/" >> "$LOG"
  grep -s '"val"' "$OUT/$name/metrics.jsonl" | tail -n 1 | cut -c1-300
}
e2e mixed_fp32
e2e mixed_fp32_graph ', cuda_graphs: true'
e2e mixed_bf16_cl_graph ', cuda_graphs: true, amp: bf16, channels_last: true'
echo "== end $(date +%T)" >> "$OUT/suite.log"
