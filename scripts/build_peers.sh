#!/usr/bin/env bash
# Builds the llama.cpp peers that `longfit bench ... --peer llama.cpp` and the serving comparison use:
#   1. llama-cpp-python, compiled from source for this CPU (no GPU, no BLAS: ggml's own kernels,
#      which is what llama.cpp users run on a CPU);
#   2. the `llama-server` (and `llama-bench`) binaries, built from the llama.cpp sources vendored in
#      the same llama-cpp-python sdist, so both peers run the same llama.cpp revision.
# llama-cpp-python's own Python server handles one request at a time; `llama-server --parallel N -cb`
# is the fair continuous-batching peer for `longfit bench serve`.
#
# Environment:
#   LONGFIT_PEERS_DIR  where the binaries go (default ~/.cache/longfit/peers); bin/ holds them.
#   PEERS_JOBS         compile jobs (default 2).
#   PEERS_SKIP_PY=1    skip step 1;  PEERS_SKIP_SERVER=1  skip step 2.
#   PEERS_AMX=1        keep ggml's AMX kernels (off by default, see below).
# Needs: cmake >= 3.18, a C++17 compiler, pip able to reach PyPI (or its mirror).
set -euo pipefail

PEERS_DIR="${LONGFIT_PEERS_DIR:-$HOME/.cache/longfit/peers}"
JOBS="${PEERS_JOBS:-2}"
mkdir -p "$PEERS_DIR/bin" "$PEERS_DIR/src"

# NOTE: on this machine's CPU (AMX-INT8 present) GGML_NATIVE compiles ggml's AMX matmul, and that kernel segfaults
# (ggml_backend_amx_mul_mat) on the first multi-token batch of a Q4_1 model. The compiler flags below keep every
# other native ISA extension (AVX-512, VNNI, BF16) and drop only AMX; the CPU repack path stays on.
if [[ "${PEERS_AMX:-0}" != 1 ]]; then
    export CFLAGS="${CFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    export CXXFLAGS="${CXXFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi

log() { printf '[build_peers %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

if [[ "${PEERS_SKIP_PY:-0}" != 1 ]]; then
    log "step 1: pip install llama-cpp-python from source (GGML_NATIVE=ON, no BLAS)"
    # --no-binary forces the source build, so GGML_NATIVE tunes the kernels to this CPU.
    CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
        python3 -m pip install --no-binary llama-cpp-python --no-cache-dir --force-reinstall --no-deps \
        llama-cpp-python
    # --no-deps keeps pip from touching numpy/torch; llama_cpp imports diskcache, its one other runtime need.
    python3 -m pip install diskcache
    python3 -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
fi

if [[ "${PEERS_SKIP_SERVER:-0}" != 1 ]]; then
    log "step 2: llama-server from the llama.cpp vendored in the llama-cpp-python sdist"
    version="$(python3 -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null || true)"
    spec="llama-cpp-python${version:+==$version}"
    rm -rf "$PEERS_DIR/src/dl"
    python3 -m pip download --no-binary :all: --no-deps -d "$PEERS_DIR/src/dl" "$spec"
    sdist="$(ls "$PEERS_DIR"/src/dl/llama_cpp_python-*.tar.gz | head -n1)"
    rm -rf "$PEERS_DIR/src/llama_cpp_python"
    mkdir -p "$PEERS_DIR/src/llama_cpp_python"
    tar xzf "$sdist" -C "$PEERS_DIR/src/llama_cpp_python" --strip-components=1
    src="$PEERS_DIR/src/llama_cpp_python/vendor/llama.cpp"
    build="$PEERS_DIR/src/build"
    # No curl/openssl (no downloads at run time), no web UI assets (they would be fetched or need npm).
    cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_BLAS=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DBUILD_SHARED_LIBS=OFF
    cmake --build "$build" --target llama-server -j"$JOBS"
    cp "$build/bin/llama-server" "$PEERS_DIR/bin/"
    # llama-bench is the reference the Performance issue quotes; cheap once ggml is built.
    if cmake --build "$build" --target llama-bench -j"$JOBS"; then
        cp "$build/bin/llama-bench" "$PEERS_DIR/bin/"
    else
        log "llama-bench did not build (llama-server did); continuing"
    fi
    "$PEERS_DIR/bin/llama-server" --version || true
fi

log "done: peers in $PEERS_DIR/bin"
