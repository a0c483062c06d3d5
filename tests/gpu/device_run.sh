#!/usr/bin/env bash
# What a device call runs (the GPU machine: see ../shared/device/README.md; carry .device/tvm-core.tar.xz,
# .device/ffitest.xz and .device/setup.sh, or .device/tvm-full.tar.xz instead of the core (xgboost: the
# tuner's cost model) for tuning with --order model (slim_device_bundle.sh says why); start with
# `source .device/setup.sh >/dev/null &&`; after ../shared/device/prepare, run tests/gpu/slim_device_bundle.sh
# once here, or the tree no longer fits the call). Results go under $OUT (the device tool brings them back).
#   bash tests/gpu/device_run.sh suite [PYTEST ARGS...]   the gpu-marked tests in 15 processes (~4 min)
#   bash tests/gpu/device_run.sh tune LIMIT_S JOB... -- TUNE ARGS...
#        JOB = formats:shapes (e.g. qtip-hyb-2:llama-2-13b); tunes into a copy of schedules/ (kept for the
#        machine's later tune steps) until LIMIT_S seconds have passed and writes it to $OUT/sched.tgz
#        (here: qcompile tune --merge DIR)
#   bash tests/gpu/device_run.sh sweep NAME TC_SWEEP ARGS...   tc_sweep rows to $OUT/NAME.json
#   bash tests/gpu/device_run.sh profile NAME PROFILE_ONE ARGS...   Nsight Compute's report of one kernel
#        (python3 -m qcompile.bench.profile_one: e.g. --format qtip-hyb-2 --shape 28672x8192 --m 1) as
#        text to $OUT/NAME.txt: speed of light, pipes, warp stalls, shared-memory bank conflicts
#   bash tests/gpu/device_run.sh wgmma NAME WGMMA_SWEEP ARGS...   wgmma GEMM configs against cuBLAS fp16 and
#        decode + cuBLAS (python3 -m qcompile.bench.wgmma_sweep; Hopper only) to $OUT/NAME.json
#   bash tests/gpu/device_run.sh gemv NAME SWEEP ARGS...   GEMV sweep rows (python3 -m qcompile.bench.sweep) to
#        $OUT/NAME.json
#   bash tests/gpu/device_run.sh viterbi NAME VITERBI_SPEED ARGS...   Viterbi engines side by side
#        (python3 -m qcompile.bench.viterbi_speed) to $OUT/NAME.json
#   bash tests/gpu/device_run.sh py NAME LIMIT_S SCRIPT ARGS...   python3 SCRIPT ARGS (at most LIMIT_S seconds),
#        its output to $OUT/NAME.txt
#   bash tests/gpu/device_run.sh plan FILE LIMIT_S   each line of FILE (a device_run.sh command; # comments)
#        in turn, each under the seconds left of LIMIT_S, all output in $OUT/plan.log; a step that fails
#        or runs out of time is logged and the plan goes on (one device call, many measurements)
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/qc-out}
mkdir -p "$out"
case "${1:-}" in
  suite)
    shift
    if [ $# -gt 0 ]; then python3 tests/gpu/parallel.py 15 tests/gpu "$@"; else python3 tests/gpu/parallel.py 15; fi ;;
  tune)
    limit=$2; shift 2
    jobs=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do jobs+=("$1"); shift; done
    [ "${1:-}" = "--" ] && shift
    # (a second tune of the same machine adds to the first's copy, so one sched.tgz holds both)
    start=$(date +%s); [ -d /tmp/qc-sched ] || cp -r schedules /tmp/qc-sched
    # (xgboost comes with .device/tvm-full.tar.xz only; without it the nearest-first order)
    if ! python3 -c "import xgboost" 2>/dev/null && [[ " $* " != *" --order "* ]]; then
      echo "tune: no xgboost here (carry .device/tvm-full.tar.xz for the cost model): --order space"; set -- "$@" --order space
    fi
    for job in "${jobs[@]}"; do
      left=$(( limit - ($(date +%s) - start) ))
      if [ $left -lt 30 ]; then echo "skipped $job: time"; continue; fi
      echo "== ${job%%:*} ${job#*:} ($left s left)"
      timeout "$left" python3 -m qcompile tune --format "${job%%:*}" --shapes "${job#*:}" --records /tmp/qc-sched "$@" \
        2>&1 | grep -v '^\['
    done
    tar czf "$out/sched.tgz" -C /tmp qc-sched ;;
  sweep)
    name=$2; shift 2
    python3 -m qcompile.bench.tc_sweep "$@" --out "$out/$name.json" ;;
  profile)
    name=$2; shift 2
    # (clocks left alone, as the device notes ask; the third launch, caches warm)
    ncu --clock-control none -k regex:main_kernel --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      --section WarpStateStats --section InstructionStats --section Occupancy --section SchedulerStats \
      --metrics l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,smsp__inst_executed_pipe_alu.sum,smsp__inst_executed_pipe_fma.sum,smsp__inst_executed_pipe_lsu.sum \
      python3 -m qcompile.bench.profile_one "$@" > "$out/$name.txt" 2>&1
    tail -60 "$out/$name.txt" ;;
  wgmma)
    name=$2; shift 2
    python3 -u -m qcompile.bench.wgmma_sweep "$@" --out "$out/$name.json" ;;
  gemv)
    name=$2; shift 2
    python3 -m qcompile.bench.sweep "$@" --out "$out/$name.json" ;;
  py)
    name=$2; limit=$3; shift 3
    timeout "$limit" python3 "$@" > "$out/$name.txt" 2>&1; rc=$?
    tail -40 "$out/$name.txt"; exit $rc ;;
  viterbi)
    name=$2; shift 2
    python3 -m qcompile.bench.viterbi_speed "$@" --json "$out/$name.json" ;;
  plan)
    file=$2; limit=$3; start=$(date +%s)
    while IFS= read -r line || [ -n "$line" ]; do
      case "$line" in ''|'#'*) continue ;; esac
      left=$(( limit - ($(date +%s) - start) ))
      if [ $left -lt 20 ]; then echo "== skipped (time): $line" | tee -a "$out/plan.log"; continue; fi
      echo "== $(date +%T) ($left s left): $line" | tee -a "$out/plan.log"
      # (each step under the time left; its own stdin, so it cannot eat the plan's lines)
      eval "timeout $left bash $0 $line" < /dev/null >> "$out/plan.log" 2>&1
      echo "== rc $? after $(( $(date +%s) - start )) s" | tee -a "$out/plan.log"
    done < "$file"
    tail -40 "$out/plan.log" ;;
  *)
    sed -n 2,20p "$0"; exit 2 ;;
esac
