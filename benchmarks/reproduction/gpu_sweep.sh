#!/usr/bin/env bash
# One device call of the reproduction (issue 7) on a 2-GPU machine: unpack the pre-tokenized Gutenberg shards
# (made here with `mosa prepare`, then xz-compressed to travel), run two queues of `run_queue.py`, one per GPU.
# Usage: bash benchmarks/reproduction/gpu_sweep.sh DATA_XZ_DIR OUT "QUEUE0 SPECS" "QUEUE1 SPECS" [SECONDS]
set -u
data_xz=$1; out=$2; queue0=$3; queue1=$4; seconds=${5:-560}
export PYTHONPATH=src PYTHONUNBUFFERED=1
data=/tmp/gutenberg
mkdir -p "$data" "$out"
cp "$data_xz"/*.json "$data"/
python3 - "$data_xz" "$data" <<'PY'
import lzma, shutil, sys, pathlib
src, dst = map(pathlib.Path, sys.argv[1:])
for f in src.glob("*.xz"):
    with lzma.open(f) as i, open(dst / f.stem, "wb") as o:
        shutil.copyfileobj(i, o, 1 << 24)
PY
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# GPU 0: its queue, then the fast path's GPU correctness check in whatever time is left
(CUDA_VISIBLE_DEVICES=0 timeout "$seconds" python3 benchmarks/reproduction/run_queue.py $queue0 --data "$data" \
    --runs /tmp/runs --out "$out" --tag 0
 left=$((seconds - SECONDS)); [ "$left" -gt 30 ] && CUDA_VISIBLE_DEVICES=0 timeout "$left" \
    python3 benchmarks/check_mosa_gpu.py --log "$out/gpu-check.txt" > "$out/gpu-check-table.txt" 2>&1) &
CUDA_VISIBLE_DEVICES=1 timeout "$seconds" python3 benchmarks/reproduction/run_queue.py $queue1 --data "$data" \
    --runs /tmp/runs --out "$out" --tag 1 &
wait
grep -h "^done\|^FAILED\|^\\$" "$out"/log-*.txt
tail -n 25 "$out/gpu-check-table.txt" 2>/dev/null
