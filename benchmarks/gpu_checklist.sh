#!/usr/bin/env bash
# The GPU checks the CPU cannot make, one stage per device call (each fits the 10-minute call limit):
#   tests   every CUDA-marked test (kernels against float64, packed documents, fused decode, CUDA graphs, compile)
#   layer   the SPEC §6 layer table (cases A-D, dense beside the fast path)
#   decode  decode throughput (compiled + CUDA graphs, DECODE_BATCH="1 32" by default): yardstick, dense and MoSA
#           models (REFERENCE=1: the fused decode beside the reference composition too)
#   tiles   the op per tile configuration (rows x warps x hidden chunk) on cases A-C (benchmarks/experiments/)
#   eval    evaluation forwards of the Tiny IsoFLOP model: top-k beside causal routing, with and without capacity
#   profile torch.profiler kernel tables of case D and of eager decode steps (benchmarks/experiments/)
#   combine the op's fp32-atomic combine against deterministic mode's per-slot rows + index_add_ (cases A-C)
#   variants the op's kernels one by one (cases A, B), the variants not yet on by default (program orders, the split
#           forward's output kernel, the weights split; about 4 minutes), Nsight Compute on each op kernel of case A
#   layers  kernel tables of the compiled layers A and B beside dense (benchmarks/experiments/)
#   select  the top-k selection kernel's bitwise search against its sort (SELECT_BY_SORT) per warp count
# Usage, from the repository root on the GPU machine: bash benchmarks/gpu_checklist.sh STAGE
# Writes its log and tables under $OUT (default ./gpu-results) and prints the short table last.
set -euo pipefail
stages="tests, layer, decode, tiles, eval, profile, combine, variants, layers or select"
stage="${1:?give a stage: $stages}"
case "$stage" in tests|layer|decode|tiles|eval|profile|combine|variants|layers|select) ;; *) echo "unknown stage '$stage': give $stages" >&2; exit 2 ;; esac
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONPATH=src
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
case "$stage" in
  tests)
    # several processes at once: most of the time is kernel compilation, which runs on the CPU cores (319 s on an
    # H100 on 2026-11-23, against more than 330 s in one process)
    ops=tests/ops
    # the op file in three processes (110 tests since session 14, when the untimed settings joined them)
    python -m pytest -m cuda -q -rA --durations=8 $ops/test_mosa_gpu.py -k "fused" > "$out/gpu-tests-op.log" 2>&1 &
    python -m pytest -m cuda -q -rA --durations=8 $ops/test_mosa_gpu.py -k "output or program_orders" \
      > "$out/gpu-tests-op-variants.log" 2>&1 &
    python -m pytest -m cuda -q -rA --durations=8 $ops/test_mosa_gpu.py \
      -k "not fused and not output and not program_orders" > "$out/gpu-tests-op-split.log" 2>&1 &
    python -m pytest -m cuda -q -rA --durations=8 tests --ignore=$ops/test_mosa_gpu.py \
      --ignore=$ops/test_sparse_decode.py --ignore=$ops/test_route_heads.py > "$out/gpu-tests-rest.log" 2>&1 &
    status=0; for job in $(jobs -p); do wait "$job" || status=1; done
    # alone: the 505-head bf16 decode tests' float64 reference takes about 57 GB (beside five other processes it
    # ran out of memory on an H100, session 12; alone it passed, session 13)
    python -m pytest -m cuda -q -rA --durations=8 $ops/test_sparse_decode.py $ops/test_route_heads.py \
      > "$out/gpu-tests-decode.log" 2>&1 || status=1
    grep -hE "FAILED|ERROR|passed|failed" "$out"/gpu-tests-*.log | tail -40; exit $status ;;
  layer)
    # the SPEC §6 cases (CASES, default "A B C D"; CASES="" none); TRAIN=1 adds whole Tiny training steps, plain and
    # packed with 4 documents per row, of TRAIN_MODELS (default all: "dense s64 s16 4+17", dense always timed;
    # with cases A-D, all four models plain and packed ran past 220 s on an H100 on 2026-11-23); COMPILE=1 times the
    # layers through torch.compile (case C is bound by the host in eager mode: mosa_layer.md, session 7)
    # shellcheck disable=SC2086  # CASES and TRAIN_MODELS are lists
    python -m torch_mosa.bench --cases ${CASES-A B C D} --paths dense fast --out "$out/mosa_layer.md" \
      ${COMPILE:+--compile-layers} \
      ${TRAIN:+--train-step --train-documents 4 --train-models ${TRAIN_MODELS:-dense s64 s16 4+17}} 2>&1 \
      | tee "$out/layer.log" | tail -30 ;;
  decode)
    # compiled + CUDA graphs only (the mode the targets are read in). DECODE_BATCH: the batch sizes
    # (default "1 32", about 60 s on an H100); REFERENCE=1 adds the reference decode's rows (about 2x the time)
    batches="${DECODE_BATCH:-1 32}"
    # shellcheck disable=SC2086  # batches is a list of sizes
    python -m torch_mosa.bench --decode --compile-decode --no-eager ${REFERENCE:+--reference-decode} \
      --decode-batches $batches --out "$out/decode-b${batches// /-}.md" 2>&1 | tee "$out/decode.log" | tail -30 ;;
  tiles)
    python benchmarks/experiments/tile_sweep.py --cases A B C 2>&1 | tee "$out/tile-sweep.log" | tail -25 ;;
  eval)
    python -m torch_mosa.bench --eval-routing --out "$out/eval-routing.md" 2>&1 | tee "$out/eval.log" | tail -12 ;;
  profile)
    python benchmarks/experiments/profile_case_d_and_decode.py --out "$out" > "$out/profile.log" 2>&1
    grep "^==" "$out/profile.txt" ;;
  combine)
    python benchmarks/experiments/combine_atomics_vs_slots.py 2>&1 | tee "$out/combine.log" | tail -10 ;;
  variants)
    # A and B only: C's hidden size 1024 would compile every variant again (about 30 kernels)
    python benchmarks/experiments/op_kernels_ncu.py --cases A B --variants > "$out/op-kernels.log" 2>&1
    if command -v ncu > /dev/null; then
      # the five kernels of the second forward + backward (the first compiled them): projection, forward rows,
      # backward rows, dx, weights
      PROFILE=1 ncu --kernel-name regex:_mosa_ --launch-skip 5 --launch-count 5 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis \
        --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct \
        python benchmarks/experiments/op_kernels_ncu.py --cases A > "$out/op-kernels-ncu.log" 2>&1
    fi
    grep -E "^## |^\| " "$out/op-kernels.log" | cut -c1-150 ;;
  layers)
    python benchmarks/experiments/profile_layer_compiled.py --cases A B > "$out/profile-layer.log" 2>&1
    grep -E "^## |^\| " "$out/profile-layer.log" | cut -c1-130 | head -80 ;;
  select)
    python benchmarks/experiments/select_by_sort.py 2>&1 | tee "$out/select-by-sort.log" | tail -52 ;;
esac
