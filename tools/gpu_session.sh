#!/usr/bin/env bash
# One call on the lent GPU machine: install, GPU tests, then the benchmarks. Logs go to $OUT.
#   bash tools/gpu_session.sh [tests|gates|kernels|quick|local|checkpoint|rebalance|elastic|all]...
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING=false
OUT=${OUT:-/tmp/es-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
  || { echo "editable install failed:"; tail -5 "$OUT/install.log"; exit 1; }
python3 -c "import expert_store, expert_store.kernels, torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.device_count(), 'GPUs', torch.cuda.get_device_name(0))"
steps=${*:-all}
run() { echo "=== $1"; shift; "$@"; echo "=== rc=$?"; }
for s in $steps; do
  case $s in
    tests|all) run gpu-tests python3 -m pytest -q -m "gpu or multigpu" -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;&
    gates|all) run gates python3 -m pytest -q -p no:cacheprovider tests/benchmarks --benchmark-only \
        --benchmark-json="$OUT/gates.json" -s 2>&1 | tee "$OUT/gates.log" | grep -E "^\[gate\]|passed|failed" ;
      python3 tools/gate_table.py "$OUT/gates.json" | tee "$OUT/gates_table.md" ;;&
    quick) run kernels-quick python3 tools/bench_kernels_gpu.py --quick 2>&1 | tee "$OUT/bench_kernels_quick.log" | tail -30 ;;&
    local|all) run local-rebalance python3 tools/bench_local_rounds_gpu.py 2>&1 | tee "$OUT/local_rounds.log" | tail -12 ;;&
    kernels|all) run kernels python3 tools/bench_kernels_gpu.py 2>&1 | tee "$OUT/bench_kernels.log" | tail -40 ;;&
    rebalance|all) run rebalance python3 tools/bench_rebalance_gpu.py --cases qwen,small,ds,qwen8 --out "$OUT" 2>&1 | tee "$OUT/bench_rebalance.log" | grep -v "^\s*$" | tail -25 ;;&
    elastic|all) run elastic python3 tools/elastic_rebalance_gpus.py --out "$OUT" 2>&1 | tail -45 ;;&
    checkpoint|all) run checkpoint python3 tools/bench_checkpoint_gpu.py 2>&1 | tee "$OUT/bench_checkpoint.log" | tail -30 ;;
  esac
done
