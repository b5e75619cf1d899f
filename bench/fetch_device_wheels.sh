#!/usr/bin/env bash
# Downloads, here, the wheels the lent GPU machine lacks (it has no internet; its python3 is 3.12), into
# .whl/ (git-ignored), for bench/device_check.sh. Its image already has xxhash, tqdm, safetensors,
# pytest, hypothesis and transformers. nvCOMP's two wheels (~34 MB) are pure-Python-tagged, CUDA 13 builds.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for pkg in "zstandard==0.25.0" "nvidia-nvcomp-cu13==6.0.0.12" "nvidia-libnvcomp-cu13==6.0.0.12"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg"
done
ls -l .whl
