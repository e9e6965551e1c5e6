#!/usr/bin/env bash
# One device call of the reproduction (issues 7 and 15): unpack the pre-tokenized Gutenberg shards (made here with
# `mosa prepare`, then xz-compressed to travel), then run one queue of `run_queue.py` per GPU, queue i on GPU i.
# Usage: bash benchmarks/reproduction/gpu_sweep.sh DATA_XZ_DIR OUT SECONDS "QUEUE0 SPECS" ["QUEUE1 SPECS" ...]
# Extra run_queue.py options (e.g. --tokens, --lr, --eval-batch-size) go in RUN_QUEUE_ARGS. FIRST_GPU (default 0) puts
# the first queue on that GPU (the next on the one after), so a sweep can share a machine with other work; two
# sweeps on one machine share the unpacked shards (each is unpacked once, under a temporary name, then renamed).
# Every queue stops at SECONDS (its unfinished run is lost; finished runs are in OUT already).
# HELDOUT_XZ=DIR (optional): held-out sets packed as DIR/NAME/{meta.json,tokenizer_meta.json,*.bin.xz} (no tokenizer,
# to travel small) are unpacked to /tmp/heldout/NAME with DATA_XZ_DIR's tokenizer.json; pass them to run_queue.py
# as `--heldout NAME=/tmp/heldout/NAME` in RUN_QUEUE_ARGS.
set -u
data_xz=${1:?DATA_XZ_DIR}; out=${2:?OUT}; seconds=${3:?SECONDS}; shift 3
[ $# -ge 1 ] || { echo "give at least one queue of run specs" >&2; exit 2; }
gpus=$(nvidia-smi -L | wc -l)
first_gpu=${FIRST_GPU:-0}
[ $((first_gpu + $#)) -le "$gpus" ] || {
  echo "$# queue(s) from GPU $first_gpu but $gpus GPU(s): give at most one queue per GPU" >&2; exit 2; }
export PYTHONPATH=src PYTHONUNBUFFERED=1
data=/tmp/gutenberg
mkdir -p "$data" "$out"
cp "$data_xz"/*.json "$data"/
python3 - "$data_xz" "$data" "${HELDOUT_XZ:-}" <<'PY'
import lzma, os, shutil, sys, pathlib
src, dst, heldout = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]


def unpack(src, dst):
    for f in src.glob("*.xz"):
        target = dst / f.stem
        if target.exists():  # unpacked by an earlier sweep on this machine (renamed only once complete)
            continue
        partial = dst / (f.stem + f".partial-{os.getpid()}")
        with lzma.open(f) as i, open(partial, "wb") as o:
            shutil.copyfileobj(i, o, 1 << 24)
        os.replace(partial, target)


unpack(src, dst)
for held in sorted(pathlib.Path(heldout).iterdir()) if heldout else []:
    target = pathlib.Path("/tmp/heldout") / held.name
    target.mkdir(parents=True, exist_ok=True)
    for f in [*held.glob("*.json"), src / "tokenizer.json"]:
        shutil.copy(f, target / f.name)
    unpack(held, target)
    print(f"held-out set {held.name}: {target}")
PY
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
left=$((seconds - SECONDS))
gpu=$first_gpu
for queue in "$@"; do
  # shellcheck disable=SC2086  # a queue is a list of run specs, split on spaces
  CUDA_VISIBLE_DEVICES=$gpu timeout "$left" python3 benchmarks/reproduction/run_queue.py $queue --data "$data" \
      --runs /tmp/runs --out "$out" --tag "$gpu" ${RUN_QUEUE_ARGS:-} &
  gpu=$((gpu + 1))
done
wait
grep -h "^done\|^FAILED\|^\\$" "$out"/log-*.txt
