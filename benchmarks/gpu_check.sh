#!/usr/bin/env bash
# The accelerator check, one script: run it on a machine with a GPU from the repository root,
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # default OUT_DIR: benchmarks/results/gpu
#
# It prints and writes (OUT_DIR/gpu_check.md, with the device name and versions):
#   1. bench_batch.py: 64 replicate fits as one vmapped NUTS job against a loop of run_nuts;
#   2. bench_perf.py --sections ess (synthetic 100 rows): ESS/s of the PC last layer and PC scale
#      against the plain Bayesian network;
#   3. bench_perf.py --sections big: a 100,000-row PC last-layer fit, time and peak RSS.
# Each step has its own time limit so the whole stays under 8 minutes; a step that runs out is
# reported as such and the others still run. QUICK=1 runs the quick modes (a CPU smoke test:
# tests/test_benchmarks_quick.py does not run this script; run it by hand).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/gpu}"
mkdir -p "$out"
mode=""
[ "${QUICK:-0}" = "1" ] && mode="--quick"
report="$out/gpu_check.md"
device=$(python -c "import jax; d = jax.devices()[0]; print(f'{d.platform}: {d.device_kind} x {jax.device_count()}')")
{
  echo "# pcbtl accelerator check"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ); device: $device; $(python -c 'import jax, numpyro; print(f"jax {jax.__version__}, numpyro {numpyro.__version__}")')"
  echo
} > "$report"
if [[ "$device" == cpu* && -z "$mode" ]]; then
  echo "warning: no accelerator found (JAX sees: $device); the figures will be CPU figures" | tee -a "$report"
fi

step() {  # step NAME LIMIT_S COMMAND...
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  echo "## $name" >> "$report"
  echo >> "$report"
  if timeout "$limit" "$@" > "$out/$name.out" 2> "$out/$name.err"; then
    cat "$out/$name.out" >> "$report"
    echo >> "$report"
    echo "($name: $((SECONDS - t0)) s)" | tee -a "$report"
  else
    local rc=$?
    echo "$name did not finish (exit $rc after $((SECONDS - t0)) s; limit $limit s); see $out/$name.err" | tee -a "$report"
  fi
  echo >> "$report"
}

step batch 290 python benchmarks/bench_batch.py $mode
step ess 120 python benchmarks/bench_perf.py $mode --sections ess --ess-rows 100
step big 60 python benchmarks/bench_perf.py $mode --sections big
echo "written: $report"
