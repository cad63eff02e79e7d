#!/usr/bin/env bash
# Set up quantkit: a virtual environment cached under ~/.cache/quantkit (keyed by a hash of
# the dependency spec, so repeated runs take seconds and a fresh machine still works),
# linked into this checkout as .venv, with quantkit installed from this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${QUANTKIT_PYTHON:-python3.11}
CACHE=${QUANTKIT_CACHE:-$HOME/.cache/quantkit}
LLAMA_VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
# The bindings, llama.cpp's tools and the converter quantkit runs all come from the sdist: it must be the file
# PyPI publishes, pinned by the sha256 that quantkit itself checks (SDIST_SHA256 in quantkit/formats/gguf/llamacpp.py).
LLAMA_SHA256=$(sed -n "s/^ *\"${LLAMA_VERSION//./\\.}\": \"\([0-9a-f]\{64\}\)\",\$/\1/p" quantkit/formats/gguf/llamacpp.py)
if [ -z "$LLAMA_SHA256" ]; then
  echo "[setup] error: no sha256 for llama-cpp-python $LLAMA_VERSION in SDIST_SHA256 (quantkit/formats/gguf/llamacpp.py)" >&2
  echo "[setup]   fix: add its sdist's sha256 from https://pypi.org/pypi/llama-cpp-python/json there" >&2
  exit 1
fi
# Optional parts to install (pyproject's extras): test, gptq (GPTQ/AWQ through GPTQModel, about
# 6 GB with the torch it needs), exl2 (exllamav2; it installs anywhere but runs only on a CUDA
# GPU), mlx (mlx and mlx-lm, CPU wheels on Linux), ray (build steps on a Ray cluster), postgres (the job queue
# on PostgreSQL), serve (the web dashboard) and ctensors (compressed-tensors folders: llm-compressor in an environment
# of its own, below). QUANTKIT_EXTRAS=test gives a lean GGUF-only environment.
EXTRAS=${QUANTKIT_EXTRAS:-test,gptq,exl2,mlx,ray,postgres,serve,ctensors}
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
cmake_args+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
# A CUDA build of llama-cpp-python and llama.cpp's tools where there is a GPU to run it and the CUDA
# compiler to build it (or with QUANTKIT_CUDA=1): GGUF evaluation then offloads every layer. nvcc alone is
# not enough: CPU machines with the CUDA toolkit exist, and a CUDA build takes far longer. QUANTKIT_CUDA=0
# keeps a CPU build on a GPU machine.
if [ "${QUANTKIT_CUDA:-}" = 1 ] || { [ "${QUANTKIT_CUDA:-}" != 0 ] && command -v nvcc >/dev/null \
     && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }; then
  cmake_args+=" -DGGML_CUDA=ON"
fi
cmake_args+=" ${QUANTKIT_CMAKE_ARGS:-}"

# Bump when the way this script builds the environment changes (not for every edit of it).
RECIPE=2
# The key is the dependency spec alone (pyproject's dependencies, extras and build requirements), so editing
# the project's other metadata reuses the environment.
spec=$($PY -c 'import json, tomllib; d = tomllib.load(open("pyproject.toml", "rb")); p = d["project"]
print(json.dumps([d["build-system"]["requires"], p["dependencies"], p["optional-dependencies"]], sort_keys=True))')
key=$( { echo "$spec"; $PY --version; echo "$RECIPE $EXTRAS $TORCH_SPEC $cmake_args"; } | sha256sum | cut -c1-16)
venv="$CACHE/venvs/$key"
wheels="$CACHE/wheels/llama-cpp-python-$LLAMA_VERSION-$(echo "$cmake_args" | sha256sum | cut -c1-12)"
sdist="$CACHE/sdist/llama_cpp_python-$LLAMA_VERSION.tar.gz"

say() { echo "[setup] $*" >&2; }

# A file that is not PyPI's is deleted, so that no later run (nor quantkit) builds from it.
check_sdist() {
  if ! echo "$LLAMA_SHA256  $1" | sha256sum --check --status -; then
    rm -f "$1"
    say "error: $1 is not the llama-cpp-python $LLAMA_VERSION source PyPI publishes (its sha256 differs); it was deleted"
    say "  fix: check the package index pip uses (pip config list), then run this again"
    exit 1
  fi
}

ensure_sdist() {
  if [ ! -f "$sdist" ]; then
    say "downloading the llama-cpp-python $LLAMA_VERSION source (it carries llama.cpp and its converter)"
    mkdir -p "$CACHE/sdist"
    tmp=$(mktemp -d "$CACHE/sdist/.dl.XXXXXX")
    pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_VERSION" -d "$tmp"
    check_sdist "$tmp/llama_cpp_python-$LLAMA_VERSION.tar.gz"
    mv "$tmp"/llama_cpp_python-"$LLAMA_VERSION".tar.gz "$sdist"
    rm -rf "$tmp"
  else
    check_sdist "$sdist"
  fi
}

if [ ! -f "$venv/.complete" ]; then
  say "creating the environment $venv (first run on this machine: about 10 minutes)"
  rm -rf "$venv"
  mkdir -p "$wheels"
  ensure_sdist
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

# llama.cpp's own programs, from the same source and flags as the bindings: llama-imatrix (importance
# matrices), llama-gguf-split (shards), llama-perplexity (the benchmark's baseline) and llama-server
# (chat templates and tool calls checked in the engine the apps use). One cmake build, so the code
# they share compiles once. Static, so they need nothing from the build folder; linked into the
# environment, where quantkit looks first. The server is built without its web UI: the UI's assets
# come from npm or the Hub, and quantkit only speaks to its HTTP API.
llama_tools=(llama-imatrix llama-gguf-split llama-perplexity llama-server)
tools="$CACHE/llama-tools/$LLAMA_VERSION-$(echo "$cmake_args ${llama_tools[*]}" | sha256sum | cut -c1-12)"
if [ ! -f "$tools/.complete" ]; then
  say "building llama.cpp's tools (${llama_tools[*]}): about 15 minutes on 2 cores"
  ensure_sdist
  mkdir -p "$CACHE/llama-tools"
  work=$(mktemp -d "$CACHE/llama-tools/.build.XXXXXX")
  tar xzf "$sdist" -C "$work" "llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp"
  command -v cmake >/dev/null || "$venv/bin/pip" install --quiet cmake ninja
  PATH="$venv/bin:$PATH"
  gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
  # shellcheck disable=SC2086  # cmake_args is a list of flags
  cmake -S "$work/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp" -B "$work/build" "${gen[@]}" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_OPENSSL=OFF $cmake_args >"$work/cmake.log" 2>&1 \
    || { cat "$work/cmake.log" >&2; exit 1; }
  cmake --build "$work/build" --target "${llama_tools[@]}" -j "$(nproc)" >"$work/build.log" 2>&1 \
    || { tail -30 "$work/build.log" >&2; exit 1; }
  rm -rf "$tools" && mkdir -p "$tools"
  for t in "${llama_tools[@]}"; do cp "$work/build/bin/$t" "$tools"/; done
  touch "$tools/.complete"
  rm -rf "$work"
fi
ln -sfn "$tools" "$venv/llama-tools"

# Environments of their own (pyproject's [tool.quantkit.environments]) for tools whose pins the main one cannot take,
# each keyed by a hash of its list and linked as $venv/envs/NAME, where quantkit looks for it.
make_env() {  # NAME: the environment pyproject lists under that name
  local name=$1 spec key env
  spec=$($PY -c 'import json, sys, tomllib; print(json.dumps(tomllib.load(open("pyproject.toml", "rb"))["tool"]["quantkit"]["environments"][sys.argv[1]]))' "$name")
  key=$( { echo "$spec"; $PY --version; echo "$RECIPE"; } | sha256sum | cut -c1-16)
  env="$CACHE/venvs/$name-$key"
  if [ ! -f "$env/.complete" ]; then
    say "creating the $name environment $env (first run on this machine: a few minutes)"
    rm -rf "$env"
    $PY -m venv "$env"
    "$env/bin/pip" install --quiet --upgrade pip
    # One resolve, torch first in the list: pip then keeps the version asked (a CPU build where one is on disk).
    SPEC="$spec" "$env/bin/python" -c 'import json, os; print("\n".join(json.loads(os.environ["SPEC"])))' > "$env/requirements.txt"
    "$env/bin/pip" install --quiet "$(head -1 "$env/requirements.txt")"
    "$env/bin/pip" install --quiet -r "$env/requirements.txt"
    touch "$env/.complete"
  fi
  mkdir -p "$venv/envs"
  ln -sfn "$env" "$venv/envs/$name"
}
case ",$EXTRAS," in *,ctensors,*) make_env llmcompressor ;; esac

# System programs the tests drive, from Debian where they are missing and this runs as root (CI); otherwise a line
# saying how: PostgreSQL's server for the queue's tests (tests/pg_server.py starts one from the installed binaries),
# and headless Chromium with its driver for the dashboard's browser tests (no browser is downloaded at test time).
debs=()
if [[ ",$EXTRAS," == *,test,* ]]; then
  if [[ ",$EXTRAS," == *,postgres,* ]] && ! command -v initdb >/dev/null \
     && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    debs+=(postgresql)
  fi
  if [[ ",$EXTRAS," == *,serve,* ]] && ! command -v chromium >/dev/null; then debs+=(chromium); fi
  if [[ ",$EXTRAS," == *,serve,* ]] && ! command -v chromedriver >/dev/null; then debs+=(chromium-driver); fi
fi
if [ ${#debs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Debian's ${debs[*]} (for the tests: the queue's PostgreSQL, the dashboard's browser)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${debs[@]}" >/dev/null
  else
    say "note: the tests need ${debs[*]}, missing here: sudo apt-get install ${debs[*]}"
  fi
fi

# setuptools is chatty about editable installs; show its output only if the install fails.
log=$(mktemp)
if ! "$venv/bin/pip" install --quiet --no-deps --no-build-isolation -e . >"$log" 2>&1; then
  cat "$log" >&2; rm -f "$log"; exit 1
fi
rm -f "$log"
ln -sfn "$venv" .venv
say "ready: $(.venv/bin/quantkit --version) in .venv -> $venv"
