#!/usr/bin/env bash
# Installs NCCL's library from PyPI (nvidia-nccl-cu13) under the PyPI CUDA
# prefix (/opt/cuda-pypi, ../shared/tools/setup-cuda-build.sh's), so that a
# GPU-less machine can build with `--features cuda,nccl`: candle links its
# CUDA libraries at build time, and cudarc's NCCL bindings then link
# libnccl too. scripts/cuda-build-env.sh puts it on LIBRARY_PATH. With a
# normal CUDA toolkit and NCCL installed (libnccl.so on the linker's path)
# you need nothing. The GPU machine loads libnccl.so.2 at run time (PyTorch's
# nvidia-nccl wheel there; scripts/cuda-libs.sh finds it).
set -euo pipefail
P=${CUDA_PYPI_PREFIX:-/opt/cuda-pypi}
VERSION=${NCCL_WHEEL_VERSION:-2.32.6}
LIB=$P/nccl/nvidia/nccl/lib
if [ ! -e "$LIB/libnccl.so.2" ]; then
    echo "pip install --target $P/nccl nvidia-nccl-cu13==$VERSION (~200 MB)" >&2
    python3 -m pip install --quiet --no-deps --no-cache-dir --target "$P/nccl" "nvidia-nccl-cu13==$VERSION" >&2 ||
        python3 -m pip install --quiet --no-deps --no-cache-dir --break-system-packages --target "$P/nccl" \
            "nvidia-nccl-cu13==$VERSION" >&2
fi
# The linker's name for it (-lnccl).
[ -e "$LIB/libnccl.so" ] || ln -s libnccl.so.2 "$LIB/libnccl.so"
echo "NCCL for linking: $LIB"
