#!/usr/bin/env bash
# Installs what vtpm needs on a Debian machine, idempotently: quick when all is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(libtpms0 libtpms-dev libfuse2 fuse tpm2-tools tpm-tools trousers swtpm swtpm-tools iproute2 openssl procps)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# npm ci only when the lock file changed since the last install.
stamp=node_modules/.vtpm-lock-stamp
if [ ! -f "$stamp" ] || ! cmp -s package-lock.json "$stamp"; then
  echo "setup: npm ci" >&2
  npm ci --no-audit --no-fund --loglevel=error 2>&1 | grep -v 'Unknown user config' >&2 || true
  [ -d node_modules/koffi ] || { echo "setup: npm ci failed" >&2; exit 1; }
  cp package-lock.json "$stamp"
fi
