# Source this on the GPU machine: puts the CUDA 13 user-space libraries the
# candle binaries link (libcudart, libcublas, libcublasLt, libcurand, libnvrtc)
# on LD_LIBRARY_PATH, from a CUDA toolkit or PyTorch's pip packages.
# libcuda.so.1 itself comes from the driver.
_vpod_dirs=()
[ -n "${CUDA_HOME:-}" ] && _vpod_dirs+=("$CUDA_HOME/lib64")
_vpod_sp=$(python3 -c 'import os, nvidia; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null || true)
if [ -n "$_vpod_sp" ]; then
    for d in "$_vpod_sp"/nvidia/cu13/lib "$_vpod_sp"/nvidia/*/lib "$_vpod_sp"/torch/lib; do
        [ -d "$d" ] && _vpod_dirs+=("$d")
    done
fi
for d in "${_vpod_dirs[@]}"; do LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; done
export LD_LIBRARY_PATH
unset _vpod_dirs _vpod_sp
