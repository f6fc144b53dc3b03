#!/usr/bin/env bash
# GPU benchmark suite: the figures in docs/benchmarks.md.  Run from the repository root on a
# machine with a CUDA GPU (and its CPU cores for the data pipeline).  Each step appends one
# JSON line to $OUT/bench.jsonl, so a run cut short keeps what it measured.
#
#   OUT=/tmp/bench bash benchmarks/gpu_suite.sh          # full sizes
#   SMALL=1 DEVICE=cpu OUT=/tmp/bench bash benchmarks/gpu_suite.sh   # a quick dry run
set -u
OUT=${OUT:-/tmp/staralign-bench}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SA="python3 -m staralign"
LOG="$OUT/bench.jsonl"
note() { echo "== $* ($(date +%T))" | tee -a "$OUT/suite.log"; }
run() {  # run NAME CMD...: one JSON line per benchmark, errors logged, never fatal
  local name=$1; shift
  note "$name"
  if out=$("$@" 2>>"$OUT/suite.log"); then
    echo "$out" | tail -n 1 | python3 -c "import json,sys; d=json.load(sys.stdin); d['name']='$name'; print(json.dumps(d))" >> "$LOG"
    echo "$out" | tail -n 1 | cut -c1-400
  else
    echo "{\"name\": \"$name\", \"error\": true}" >> "$LOG"
  fi
}

if [ "${SMALL:-0}" = 1 ]; then
  M="--nstack 1 --nlevels 2 --channels 32 --input-size 64"; B=4; IT="--iters 2 --repeats 1"; NIMG=16; WK=2
else
  M=""; B=32; IT="--iters 20 --repeats 5"; NIMG=256; WK=16
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee -a "$OUT/suite.log"

# Issue 2: the STAR loss, forward + backward on (32, 98, 64, 64); reference_style is the original's
# approach (materialised covariance, CPU eigh round trip) on the same device.
run loss_fp32 $SA bench loss --device $DEVICE --batch-size $B --json
run loss_bf16 $SA bench loss --device $DEVICE --batch-size $B --dtype bfloat16 --json

# No host synchronisation inside STAR (raises if the loss syncs).
note "star_no_sync"
python3 - >> "$OUT/suite.log" 2>&1 <<'EOF'
import json, os, torch
from staralign.losses import STARLoss
dev = os.environ.get("DEVICE", "cuda")
if dev.startswith("cuda"):
    h = torch.rand(32, 98, 64, 64, device=dev).pow(8).requires_grad_(True)
    gt = torch.rand(32, 98, 2, device=dev) * 2 - 1
    loss = STARLoss()
    loss(h, gt).backward(); torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    ok = True
    try:
        loss(h, gt).backward()
    except RuntimeError as exc:
        ok = False; print("sync:", exc)
    torch.cuda.set_sync_debug_mode(0)
    # GPU eigenvectors vs torch.linalg.eigh columns, and the CPU reference loss value.
    from staralign.heatmaps import heatmap_moments
    m = heatmap_moments(h.detach())
    ev, evec = torch.linalg.eigh(m.covariance.double())
    dots = (evec[..., :, 1] * m.eigenvectors[..., :, 1].double()).sum(-1).abs()
    cpu = float(loss(h.detach().cpu(), gt.cpu())); gpu = float(loss(h.detach(), gt))
    print(json.dumps({"name": "star_checks", "no_sync": ok, "min_tangent_dot_vs_eigh": float(dots.min()),
                      "loss_cpu": cpu, "loss_gpu": gpu, "rel": abs(cpu - gpu) / abs(cpu)}))
EOF
grep '"star_checks"' "$OUT/suite.log" >> "$LOG"

# Issue 4: device-side targets on the GPU equal the numpy path; their cost per batch.
note "targets_gpu"
python3 - >> "$LOG" 2>>"$OUT/suite.log" <<'PYEOF'
import json, os, time, numpy as np, torch
from staralign.definitions import get_definition
from staralign.data.targets.points import point_maps, point_maps_torch
from staralign.data.targets.edges import edge_maps, edge_maps_torch
dev = os.environ.get("DEVICE", "cuda")
d = get_definition("WFLW"); g = torch.Generator().manual_seed(0)
base = torch.rand(98, 2, generator=g) * 0.5 + 0.25
pts = ((base + 0.03 * torch.randn(32, 98, 2, generator=g)) * 256).clamp(-5, 260)
pm, em = point_maps_torch(pts.to(dev)), edge_maps_torch(pts.to(dev), d)
ref_p = np.stack([point_maps(p.numpy()) for p in pts]); ref_e = np.stack([edge_maps(p.numpy(), d) for p in pts])
sync = (lambda: torch.cuda.synchronize()) if dev.startswith("cuda") else (lambda: None)
def timed(fn, n=20):
    fn(); sync(); t = time.perf_counter()
    for _ in range(n): fn()
    sync()
    return (time.perf_counter() - t) / n * 1000
p_dev = pts.to(dev)
print(json.dumps({"name": "targets_gpu", "device": dev,
    "point_max_abs": float(np.abs(pm.cpu().numpy() - ref_p).max()),
    "edge_max_abs": float(np.abs(em.cpu().numpy() - ref_e).max()),
    "edge_mean_abs": float(np.abs(em.cpu().numpy() - ref_e).mean()),
    "point_ms_b32": timed(lambda: point_maps_torch(p_dev)), "edge_ms_b32": timed(lambda: edge_maps_torch(p_dev, d))}))
PYEOF

# Issue 3: inference latency / throughput and the speed paths (each checked against fp32 eager).
run infer_b1_fp32 $SA bench infer --device $DEVICE --batch-size 1 $M $IT --json
run infer_b32_fp32 $SA bench infer --device $DEVICE --batch-size $B $M $IT --json
run infer_b32_cl_bf16 $SA bench infer --device $DEVICE --batch-size $B $M $IT --channels-last --amp bf16 --json
run infer_b32_cl_fp16 $SA bench infer --device $DEVICE --batch-size $B $M $IT --channels-last --amp fp16 --json
run infer_b1_graphs_fp16 $SA bench infer --device $DEVICE --batch-size 1 $M $IT --channels-last --amp fp16 --cuda-graphs --json
run infer_b1_graphs_fp32 $SA bench infer --device $DEVICE --batch-size 1 $M $IT --cuda-graphs --json

# Issue 5: a full training step (forward, recipe loss with device-side targets, backward, Adam, EMA).
run train_fp32 $SA bench train --device $DEVICE --batch-size $B $M $IT --json
run train_original_style $SA bench train --device $DEVICE --batch-size $B $M $IT --original-style --json
run train_bf16_cl $SA bench train --device $DEVICE --batch-size $B $M $IT --amp bf16 --channels-last --cudnn-benchmark --json

# Issue 4: the data pipeline on this machine's cores (512 px JPEGs, WFLW, worker-side targets).
run data_w${WK} $SA bench data --workers $WK --json
run data_w1 $SA bench data --workers 1 --json

# Issue 5: end to end, the real trainer reading synthetic JPEGs from disk.
note "e2e"
SYN="$OUT/synth"
$SA data synth --out "$SYN" --train $((NIMG * 8)) --test 64 --size 256 --workers $WK --quiet 2>>"$OUT/suite.log"
cat > "$OUT/e2e.yaml" <<EOF
optim: {epochs: 2, batch_size: $B}
data: {workers: $WK, val_batch_size: 64}
runtime: {amp: bf16, channels_last: true, cudnn_benchmark: true, tensorboard: false, log_every: 50}
EOF
if [ "${SMALL:-0}" = 1 ]; then
  printf 'model: {nstack: 1, nlevels: 2, channels: 32, input_size: 64}\n' >> "$OUT/e2e.yaml"
fi
$SA train --preset paper --config "$OUT/e2e.yaml" --data-definition WFLW --image-dir "$SYN" --annot-dir "$SYN" \
  --device $DEVICE --out "$OUT/e2e_run" >> "$OUT/suite.log" 2>&1
python3 - "$OUT/e2e_run/metrics.jsonl" >> "$LOG" <<'EOF'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if '"val"' in l]
print(json.dumps({"name": "e2e_train_bf16_cl", "epochs": [{k: r[k] for k in ("epoch", "images_per_s", "train_seconds", "nme")} for r in recs]}))
EOF

# GPU-only tests of the speed paths.
note "cuda tests"
python3 -m pytest -q tests/test_model_speed.py -p no:cacheprovider >> "$OUT/suite.log" 2>&1

# torch.compile last: the slowest to set up.
run infer_b32_compile_bf16 $SA bench infer --device $DEVICE --batch-size $B $M $IT --channels-last --amp bf16 --compile --json
run train_bf16_cl_compile $SA bench train --device $DEVICE --batch-size $B $M $IT --amp bf16 --channels-last --cudnn-benchmark --compile --json
note "done"
