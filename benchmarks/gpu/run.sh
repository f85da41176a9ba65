#!/usr/bin/env bash
# GPU benchmarks of issue 21: lvmzoo vs scvi-tools on the same GPU, in one run.
#
# On the device machine (after `bash benchmarks/gpu/fetch_wheels.sh` here):
#   run(command="bash benchmarks/gpu/run.sh", carry=[".whl"], timeout_s=590)
# CPU dry run here (tiny sizes, this interpreter, nothing installed):
#   LVMZOO_GPU_DRY_RUN=1 PYTHON=/work/benchvenv/bin/python bash benchmarks/gpu/run.sh
#
# Steps (each under its own `timeout`, within LVMZOO_GPU_BUDGET_S seconds in all):
#   env         nvidia-smi, jax.devices(), torch.cuda, versions, unmet requirements
#   scvi        benchmarks/bench_scvi.py: held-out LL and epoch time, both tools on the GPU
#   scale_100k  benchmarks/bench_scale.py at 100k cells: lvmzoo in memory (CSR on the
#               device, one chunk per epoch), lvmzoo streamed from the .h5ad (chunks of
#               steps put on the device while the previous chunk trains), the loader
#               alone, scvi-tools
#   tile_1m     the 1M-cell file as 10 copies of the 100k cells (bounded memory, fast)
#   scale_1m    the lvmzoo variants at 1M cells, then scale_1m_scvi: scvi-tools at 1M
#   collect     $OUT: log.txt, env.txt, gpu_scvi.{json,md}, gpu_scale.{json,md},
#               gpu_raw.tar.gz (every output, the figures too; no data)
# Sizes and epochs: the SCVI_*/SCALE_* variables below (environment overrides).
# LVMZOO_GPU_STEPS=prep_small,tile_large,scale_large_scvi (say) runs only those steps
# (env always runs).
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
DRY=${LVMZOO_GPU_DRY_RUN:-0}
export PYTHONUNBUFFERED=1
if [[ $DRY == 1 ]]; then
  OUT=${OUT:-$(mktemp -d /tmp/lvmzoo_gpu_out.XXXXXX)}
  WORK=${LVMZOO_GPU_WORK:-$(mktemp -d /tmp/lvmzoo_gpu_work.XXXXXX)}
  PY=${PYTHON:-python3}
  BUDGET=${LVMZOO_GPU_BUDGET_S:-1500}
  export JAX_PLATFORMS=cpu LVMZOO_BENCH_ACCELERATOR=cpu
  # Imports limited to the GPU machine's image + the carried wheels (sitecustomize).
  export LVMZOO_GPU_DRY_RUN=1 PYTHONPATH=$REPO/benchmarks/gpu/dry_run_site:$REPO
  SCVI_SIZES=${SCVI_SIZES:-2000} SCVI_EPOCHS=${SCVI_EPOCHS:-2} SCVI_REPEATS=${SCVI_REPEATS:-1}
  SCVI_K=${SCVI_K:-5} SCVI_MAX_HELDOUT=${SCVI_MAX_HELDOUT:-100}
  SMALL=${SCALE_SMALL:-2000} LARGE=${SCALE_LARGE:-4000}
  SMALL_EPOCHS=${SCALE_SMALL_EPOCHS:-2} LARGE_EPOCHS=${SCALE_LARGE_EPOCHS:-2}
else
  OUT=${OUT:?OUT is set by the device tool}
  WORK=${LVMZOO_GPU_WORK:-/tmp/lvmzoo_gpu}
  PY=${PYTHON:-python3}
  BUDGET=${LVMZOO_GPU_BUDGET_S:-565}   # the call's timeout_s is 590: keep 25 s for collect
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}   # fail rather than fall back to the CPU
  export LVMZOO_BENCH_ACCELERATOR=${LVMZOO_BENCH_ACCELERATOR:-gpu}
  SCVI_SIZES=${SCVI_SIZES:-mouse_10k,20000} SCVI_EPOCHS=${SCVI_EPOCHS:-10,5}
  SCVI_REPEATS=${SCVI_REPEATS:-1} SCVI_K=${SCVI_K:-100} SCVI_MAX_HELDOUT=${SCVI_MAX_HELDOUT:-1000}
  SMALL=${SCALE_SMALL:-100000} LARGE=${SCALE_LARGE:-1000000}
  SMALL_EPOCHS=${SCALE_SMALL_EPOCHS:-2} LARGE_EPOCHS=${SCALE_LARGE_EPOCHS:-2}
fi
mkdir -p "$OUT" "$WORK/data"
START=$SECONDS
STATUS=()

# step NAME CAP_SECONDS COMMAND...: run under `timeout` (the whole process group),
# capped by what is left of the budget; record and print the exit status.
step() {
  local name=$1 cap=$2; shift 2
  if [[ -n ${LVMZOO_GPU_STEPS:-} && $name != env && ,$LVMZOO_GPU_STEPS, != *,$name,* ]]; then
    echo "=== step $name not selected (LVMZOO_GPU_STEPS)"; return
  fi
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 20)); then
    echo "=== step $name SKIPPED: ${left}s of the budget left"; STATUS+=("$name:skipped"); return
  fi
  echo "=== step $name (limit ${limit}s, at $((SECONDS - START))s) $(date -u +%T)"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@"
  local rc=$?
  ((rc == 124 || rc == 137)) && echo "=== step $name TIMED OUT after ${limit}s"
  echo "=== step $name rc=$rc in $((SECONDS - t0))s"
  STATUS+=("$name:rc=$rc:$((SECONDS - t0))s")
}

main() {
  echo "lvmzoo GPU benchmarks (issue 21): dry_run=$DRY out=$OUT work=$WORK budget=${BUDGET}s $(date -u)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed paths"
  if [[ $DRY != 1 ]]; then
    echo "=== install wheels"
    "$PY" benchmarks/gpu/install_wheels.py .whl /tmp/site || { echo "wheel install FAILED"; return 1; }
    export PYTHONPATH=/tmp/site:$REPO
  else
    "$PY" benchmarks/gpu/install_wheels.py .whl --image-packages benchmarks/gpu/image_packages.txt --plan-only
  fi
  step env 90 "$PY" benchmarks/gpu/env_check.py "$OUT/env.txt"
  if [[ ${STATUS[-1]} != env:rc=0:* ]]; then
    # Every later step would fail the same way: stop now, while a rerun still fits.
    echo "=== env check failed: stopping (see env.txt)"
    "$PY" benchmarks/gpu/collect.py "$WORK" "$OUT" --steps "${STATUS[*]}" --dry-run "$DRY"
    return 1
  fi

  step scvi 180 "$PY" benchmarks/bench_scvi.py --sizes "$SCVI_SIZES" --epochs "$SCVI_EPOCHS" \
    --repeats "$SCVI_REPEATS" --n-samples "$SCVI_K" --max-heldout "$SCVI_MAX_HELDOUT" \
    --no-warmup --accelerator "$LVMZOO_BENCH_ACCELERATOR" --output-dir "$WORK/scvi"

  local base="$WORK/data/simulated_${SMALL}x2000.h5ad" big="$WORK/data/simulated_${LARGE}x2000.h5ad"
  # The small file once (with its sidecar .json, so --keep-data reuses it), then its runs.
  [[ -f ${base%.h5ad}.json ]] || step prep_small 90 "$PY" benchmarks/bench_scale.py --prepare "$SMALL" --data "$base"
  step scale_small 140 "$PY" benchmarks/bench_scale.py --sizes "$SMALL" --epochs "$SMALL_EPOCHS" \
    --gene-sweep none --de skip --keep-data "$WORK/data" --output-dir "$WORK/scale_small"

  if [[ -f ${base%.h5ad}.json ]]; then
    [[ -f ${big%.h5ad}.json ]] || step tile_large 90 "$PY" benchmarks/bench_scale.py --prepare "$LARGE" \
      --tile-from "$base" --data "$big"
  else
    echo "no $base: the large file is simulated by bench_scale itself"
  fi
  step scale_large 130 "$PY" benchmarks/bench_scale.py --sizes "$LARGE" --epochs "$LARGE_EPOCHS" \
    --variants lvmzoo-ooc,loader,lvmzoo --gene-sweep none --de skip --keep-data "$WORK/data" \
    --output-dir "$WORK/scale_large"
  step scale_large_scvi 240 "$PY" benchmarks/bench_scale.py --sizes "$LARGE" --epochs "$LARGE_EPOCHS" \
    --variants scvi-tools --gene-sweep none --de skip --keep-data "$WORK/data" \
    --output-dir "$WORK/scale_large_scvi"

  echo "=== steps: ${STATUS[*]}"
  echo "=== total $((SECONDS - START))s"
  "$PY" benchmarks/gpu/collect.py "$WORK" "$OUT" --steps "${STATUS[*]}" --dry-run "$DRY"
}

main 2>&1 | tee "$OUT/log.txt"
rc=${PIPESTATUS[0]}
[[ $DRY == 1 ]] && rm -rf "$WORK/data"
echo "outputs in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$rc"
