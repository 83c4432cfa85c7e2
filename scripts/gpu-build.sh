#!/usr/bin/env bash
# Builds, on this machine (no GPU needed), everything the GPU machine runs:
# the `cli` binary, the integration-test binary and the `vpod-bench`
# benchmark binary with `--features cuda`,
# stripped and packed into gpu-bundle/bundle.tar.xz (git-ignored, ~12 MB of
# the 64 MiB a device call carries). Then, on the GPU machine:
#   bash scripts/gpu-run.sh          (see that script)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_HOME:-}" ]; then
    if [ -x /opt/cuda-pypi/cuda/bin/nvcc ]; then
        # shellcheck source=scripts/cuda-build-env.sh
        source scripts/cuda-build-env.sh
    else
        echo "no nvcc: install a CUDA toolkit, or on a GPU-less box run ../shared/tools/setup-cuda-build.sh" >&2
        exit 1
    fi
fi
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

# VPOD_FEATURES=cuda,nccl adds NCCL for --tensor-parallel over GPUs: the
# binaries then link libnccl (scripts/setup-nccl-build.sh installs it here),
# and the bundle is gpu-bundle-nccl/bundle.tar.xz, apart from the plain one
# (a call carries one of the two folders: both with .anchors/ pass the 64 MiB;
# run it with BUNDLE=gpu-bundle-nccl/bundle.tar.xz bash scripts/gpu-run.sh tp).
features=${VPOD_FEATURES:-cuda}
out=gpu-bundle
if [[ "$features" == *nccl* ]]; then
    out=gpu-bundle-nccl
    # setup-nccl-build.sh's library, also when cuda-build-env.sh was sourced before it ran.
    nccl_lib=${CUDA_PYPI_PREFIX:-/opt/cuda-pypi}/nccl/nvidia/nccl/lib
    [ -d "$nccl_lib" ] && export LIBRARY_PATH=$nccl_lib${LIBRARY_PATH:+:$LIBRARY_PATH}
fi
cargo build --release -p vpod-cli --features "$features"
cargo build --release -p vpod-benches --features "$features" --bin vpod-bench
# The test binary: built with its errors shown, then found (the JSON run below hides them).
cargo test --release -p vpod-cli --features "$features" --no-run
test_exe=$(cargo test --release -p vpod-cli --features "$features" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "integration":
        print(m["executable"])')
[ -n "$test_exe" ] || { echo "integration test binary not found" >&2; exit 1; }

stage=$(mktemp -d)
cp target/release/cli "$stage/cli"
cp "$test_exe" "$stage/integration"
cp target/release/vpod-bench "$stage/vpod-bench"
strip "$stage/cli" "$stage/integration" "$stage/vpod-bench"
rm -rf "$out" && mkdir -p "$out"
# One xz stream with a dictionary larger than a binary: the three share most
# of their bytes (candle, cudarc, our fatbins), so the second and third pack
# to little: ~12 MB instead of ~28 MB with xz's default 8 MiB dictionary,
# which leaves room in a call's 64 MiB for .anchors/ (FlashInfer) too.
# Unpacking needs 256 MiB of memory.
tar -C "$stage" -cf - cli integration vpod-bench | xz -T1 --lzma2=preset=6,dict=256MiB > "$out/bundle.tar.xz"
{ git rev-parse HEAD 2>/dev/null || true; date -u +%FT%TZ; echo "features: $features"; ls -l "$stage"; } > "$out/manifest.txt"
rm -rf "$stage"
du -h "$out/bundle.tar.xz"
