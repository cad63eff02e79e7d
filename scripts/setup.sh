#!/usr/bin/env bash
# Set up quantkit: a virtual environment cached under ~/.cache/quantkit (keyed by a hash of
# the dependency spec, so repeated runs take seconds and a fresh machine still works),
# linked into this checkout as .venv, with quantkit installed from this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${QUANTKIT_PYTHON:-python3.11}
CACHE=${QUANTKIT_CACHE:-$HOME/.cache/quantkit}
LLAMA_VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
# Optional parts to install (pyproject's extras): test, and gptq (GPTQ/AWQ through GPTQModel,
# about 6 GB with the torch it needs). QUANTKIT_EXTRAS=test gives a lean GGUF-only environment.
EXTRAS=${QUANTKIT_EXTRAS:-test,gptq}
# GPTQModel needs torch>=2.14.1; without it, the CPU wheel of 2.13.0 (a plain `torch` would pull a
# multi-GB CUDA build anyway).
case ",$EXTRAS," in
  *,gptq,*) TORCH_SPEC=${QUANTKIT_TORCH:-torch==2.14.1} ;;
  *) TORCH_SPEC=${QUANTKIT_TORCH:-torch==2.13.0} ;;
esac

# llama.cpp's -march=native build enables AMX kernels that crash on some virtual machines
# (seen: segfault on the first decode of a Q8_0 model); build for a fixed x86-64 level instead.
cmake_args="-DGGML_NATIVE=OFF"
if [ "$(uname -m)" = x86_64 ]; then
  cmake_args+=" -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
  if grep -qw avx512f /proc/cpuinfo; then cmake_args+=" -DGGML_AVX512=ON"; fi
  if grep -qw avx512_vnni /proc/cpuinfo; then cmake_args+=" -DGGML_AVX512_VNNI=ON"; fi
  if grep -qw avx512_bf16 /proc/cpuinfo; then cmake_args+=" -DGGML_AVX512_BF16=ON"; fi
fi
cmake_args+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF ${QUANTKIT_CMAKE_ARGS:-}"

# Bump when the way this script builds the environment changes (not for every edit of it).
RECIPE=1
key=$( { cat pyproject.toml; $PY --version; echo "$RECIPE $EXTRAS $TORCH_SPEC $cmake_args"; } | sha256sum | cut -c1-16)
venv="$CACHE/venvs/$key"
wheels="$CACHE/wheels/llama-cpp-python-$LLAMA_VERSION-$(echo "$cmake_args" | sha256sum | cut -c1-12)"
sdist="$CACHE/sdist/llama_cpp_python-$LLAMA_VERSION.tar.gz"

say() { echo "[setup] $*" >&2; }

if [ ! -f "$venv/.complete" ]; then
  say "creating the environment $venv (first run on this machine: about 10 minutes)"
  rm -rf "$venv"
  mkdir -p "$CACHE/sdist" "$wheels"
  if [ ! -f "$sdist" ]; then
    say "downloading the llama-cpp-python $LLAMA_VERSION source (it carries llama.cpp and its converter)"
    tmp=$(mktemp -d "$CACHE/sdist/.dl.XXXXXX")
    pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_VERSION" -d "$tmp"
    mv "$tmp"/llama_cpp_python-"$LLAMA_VERSION".tar.gz "$sdist"
    rm -rf "$tmp"
  fi
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    say "building llama-cpp-python $LLAMA_VERSION (about 7 minutes on 2 cores)"
    tmp=$(mktemp -d "$wheels/.build.XXXXXX")
    CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      pip wheel --quiet --no-cache-dir --no-deps "$sdist" -w "$tmp"
    mv "$tmp"/*.whl "$wheels"/
    rm -rf "$tmp"
  fi
  # The .complete marker, written last, tells a finished environment from an interrupted one.
  $PY -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip setuptools wheel
  "$venv/bin/pip" install --quiet "$TORCH_SPEC"
  # Dependencies only; the package itself is installed (editable) from whichever checkout runs this.
  EXTRAS="$EXTRAS" "$venv/bin/python" -c 'import os, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; extras = [e for e in os.environ["EXTRAS"].split(",") if e]; print("\n".join(p["dependencies"] + [r for e in extras for r in p["optional-dependencies"][e]]))' > "$venv/requirements.txt"
  "$venv/bin/pip" install --quiet --find-links "$wheels" -r "$venv/requirements.txt"
  touch "$venv/.complete"
fi

# setuptools is chatty about editable installs; show its output only if the install fails.
log=$(mktemp)
if ! "$venv/bin/pip" install --quiet --no-deps --no-build-isolation -e . >"$log" 2>&1; then
  cat "$log" >&2; rm -f "$log"; exit 1
fi
rm -f "$log"
ln -sfn "$venv" .venv
say "ready: $(.venv/bin/quantkit --version) in .venv -> $venv"
