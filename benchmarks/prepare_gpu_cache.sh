#!/usr/bin/env bash
# Fills the ignored folder .bench-cache/ for benchmarks/gpu_suite.sh on a GPU machine without network:
#   .bench-cache/wheels/        diffusers, datasets (with dill, multiprocess) and peft wheels for Python 3.12
#   .bench-cache/diffusion_dpo/ diffusers' research scripts, copied from DIFFUSERS_CHECKOUT if given
# Usage (on a machine with network): benchmarks/prepare_gpu_cache.sh [DIFFUSERS_CHECKOUT]
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=$REPO/.bench-cache
mkdir -p "$CACHE/wheels" "$CACHE/diffusion_dpo"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do platforms+=(--platform "$tag"); done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d "$CACHE/wheels" diffusers==0.42.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 peft==0.21.2 || exit 1
if [ $# -ge 1 ]; then
    cp "$1"/examples/research_projects/diffusion_dpo/train_diffusion_dpo{,_sdxl}.py "$CACHE/diffusion_dpo/" || exit 1
fi
ls -l "$CACHE"/wheels "$CACHE"/diffusion_dpo
