#!/usr/bin/env bash
# Installs the benchmark peers into bench/.work, never into the product's venv:
#   - llama.cpp built once from the vendored sources of the llama-cpp-python sdist on PyPI
#     (CPU only): the shared libraries for llama-cpp-python and the native `llama-server`
#     (continuous batching with -np N), so both peers run the very same llama.cpp code;
#   - a separate venv with llama-cpp-python installed from that sdist without a second
#     compile (it loads the libraries above through LLAMA_CPP_LIB_PATH).
# HF transformers (eager) is the third peer; it runs from the product venv, where the
# `test` extra already installs it, so the bench never adds a runtime dependency.
# Idempotent: finished steps are skipped (stamp files), so `make bench` re-runs are cheap.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
HERE="$(cd "$(dirname "$0")" && pwd)"
WORK="${BENCH_WORK:-$HERE/.work}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc)}"
SRC="$WORK/dl/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
BUILD="$WORK/llama-build"
VENV="$WORK/venv"

mkdir -p "$WORK/dl"

if [ ! -x "$VENV/bin/pip" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
fi

if [ ! -d "$SRC" ]; then
    (cd "$WORK/dl" && "$VENV/bin/pip" download -q --no-binary :all: --no-deps \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION")
    tar -xzf "$WORK/dl/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" -C "$WORK/dl"
fi

if [ ! -x "$BUILD/bin/llama-server" ]; then
    # Every instruction set this CPU runs, as a user compiling llama.cpp here would get,
    # spelled out instead of GGML_NATIVE: a VM may advertise AMX (cpuid flags) without
    # granting the tile state, and ggml's AMX kernels then die with SIGILL (seen here).
    flags=$(grep -m1 '^flags' /proc/cpuinfo)
    has() { case " $flags " in *" $1 "*) echo ON ;; *) echo OFF ;; esac; }
    cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -G Ninja \
        -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF \
        -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)" \
        -DGGML_F16C="$(has f16c)" -DGGML_BMI2="$(has bmi2)" -DGGML_AVX_VNNI="$(has avx_vnni)" \
        -DGGML_AVX512="$(has avx512f)" -DGGML_AVX512_VBMI="$(has avx512vbmi)" \
        -DGGML_AVX512_VNNI="$(has avx512_vnni)" -DGGML_AVX512_BF16="$(has avx512_bf16)" \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
        -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_APP=OFF
    cmake --build "$BUILD" -j "$JOBS" --target llama-server llama
fi

if [ ! -f "$VENV/.installed" ]; then
    # LLAMA_BUILD=OFF: the Python package only; its native library comes from $BUILD/bin.
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
        "$VENV/bin/pip" install -q "$WORK/dl/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" \
        numpy psutil
    touch "$VENV/.installed"
fi

echo "llama-server: $BUILD/bin/llama-server"
echo "llama-cpp-python: $VENV/bin/python (LLAMA_CPP_LIB_PATH=$BUILD/bin)"
