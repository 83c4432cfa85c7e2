# Source this before building with `--features cuda` on a machine whose CUDA
# toolkit came from PyPI wheels (../shared/tools/setup-cuda-build.sh installs
# nvcc 13.0 and the CUDA libraries into /opt/cuda-pypi without a GPU).
# With a normal CUDA toolkit (nvcc on PATH or CUDA_HOME set) you need nothing.
P=${CUDA_PYPI_PREFIX:-/opt/cuda-pypi}
export CUDA_HOME=$P/cuda
export CUDA_PATH=$P/cuda
export PATH=$P/cuda/bin:$PATH
# Hopper (H100/H200): candle's kernels as sm_90a cubins; ours get sm_90a + compute_80 PTX (kernels/build.rs).
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
# cudarc's bindings pinned to the CUDA 13.0 driver API (driver 580).
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
# Link against the libcuda stub: the real driver is only on the GPU machine.
export LIBRARY_PATH=$P/cuda/lib64:$P/cuda/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
# NCCL for `--features cuda,nccl` builds (scripts/setup-nccl-build.sh installs it).
[ -d "$P/nccl/nvidia/nccl/lib" ] && export LIBRARY_PATH=$P/nccl/nvidia/nccl/lib:$LIBRARY_PATH
export CUDAFORGE_HOME=$P/cudaforge
