#!/usr/bin/env bash
# Download, here (with network), the wheels the GPU machine lacks into .whl/ at the
# repo root, for benchmarks/gpu/run.sh to install there (no network on that machine).
#
#   bash benchmarks/gpu/fetch_wheels.sh          # then: run(command="bash benchmarks/gpu/run.sh", carry=[".whl"], timeout_s=590)
#
# The machine's image (/work/.library/device/KINDS.md, read 2026-11-17) has python 3.12,
# jax 0.11.2 (+cuda13 plugin), numpyro 0.21.0, flax, optax, torch 2.11 (CUDA), lightning,
# pandas, h5py, scipy, scikit-learn, numba, xarray, statsmodels, seaborn, ... but not
# anndata, zarr, arviz, funsor or scvi-tools.  Versions below are those of
# /work/benchvenv, where bench_scvi.py / bench_scale.py run on CPU.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PYTHON:-python3}
DEST=.whl

# Keep the folder out of git (idempotent).
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

# Missing from the image: lvmzoo's runtime dependencies (pyproject.toml) and theirs.
LVMZOO=(
  anndata==0.12.19 array-api-compat==1.16.0 legacy-api-wrap==1.5 natsort==8.4.0
  scverse-misc==0.0.3 session-info2==0.4.1
  zarr==3.1.6 donfig==0.8.1.post1 google-crc32c==1.9.0 numcodecs==0.16.6
  arviz==0.23.4 h5netcdf==1.8.3 xarray-einstats==0.9.1 platformdirs==4.14.9
  funsor==0.4.8 makefun==1.16.0
  numpyro==0.22.0   # the image has 0.21.0; lvmzoo needs >= 0.22.0
)
# scvi-tools 1.4.2 and what of its (non-extra) requirements the image lacks.
SCVI=(
  scvi-tools==1.4.2 ml-collections==1.1.0 mudata==0.3.10
  pyro-ppl==1.9.2 pyro-api==0.1.2 sparse==0.19.3
  scanpy==1.11.5 pynndescent==0.7.0 umap-learn==0.5.12
)
# Fallbacks: installed there only when the image's version breaks a requirement
# (install_wheels.py decides): anndata 0.12 needs pandas < 3, and the image's
# package list has neither pytz nor tzdata, which pandas 2 needs.
FALLBACK=(pandas==2.3.3 pytz==2026.6 tzdata==2026.6)
# Published as source only: built here into a pure-python wheel (py3-none-any).
SOURCE_ONLY=(docrep==0.3.2)

mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${LVMZOO[@]}" "${SCVI[@]}" "${FALLBACK[@]}" 2> >(grep -v '^WARNING: Location' >&2)
"$PY" -m pip wheel -q --no-deps -w "$DEST" "${SOURCE_ONLY[@]}" 2> >(grep -v '^WARNING: Location' >&2)
for spec in "${SOURCE_ONLY[@]}"; do
  ls "$DEST/${spec%%==*}-${spec##*==}-py3-none-any.whl" >/dev/null  # pure python, or fail
done

# Exactly these wheels (name and version): drop any left from an earlier list, since
# two versions of one package stop the whole install there.
norm() { sed 's/[-_.]\+/_/g' | tr A-Z a-z; }
want=$(for spec in "${LVMZOO[@]}" "${SCVI[@]}" "${FALLBACK[@]}" "${SOURCE_ONLY[@]}"; do
         echo "$(norm <<<"${spec%%==*}")-${spec##*==}"; done | sort -u)
for f in "$DEST"/*.whl; do
  base=$(basename "$f")
  key="$(cut -d- -f1 <<<"$base" | norm)-$(cut -d- -f2 <<<"$base")"
  grep -qxF "$key" <<<"$want" || { echo "removing stale $f"; rm -f "$f"; }
done

n=$(ls "$DEST"/*.whl | wc -l)
echo "wheels in $DEST: $n (want $(wc -l <<<"$want"))"
ls -1 "$DEST"
echo "wheels total: $(du -sh "$DEST" | cut -f1)"
tracked=$(git ls-files -z | du -ch --files0-from=- 2>/dev/null | tail -1 | cut -f1)
untracked=$(git ls-files -o --exclude-standard -z | du -ch --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "tracked files: $tracked, untracked not ignored: ${untracked:-0} (the run tool carries <= 64 MiB of these + .whl)"
