#!/usr/bin/env bash
# Installs what vtpm needs on a Debian machine, idempotently: quick when all is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(libtpms0 libtpms-dev libfuse2 fuse tpm2-tools tpm-tools trousers swtpm swtpm-tools iproute2 util-linux openssl procps)
# A QEMU/KVM guest for the swtpm control channel's end-to-end test: only what it boots;
# containers for the OCI hook's (podman, and the runtimes it and the tests run: runc, crun).
GUEST_PKGS=(qemu-system-x86 linux-image-amd64 busybox-static podman runc crun)
missing() {
  local out=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || out+=("$p")
  done
  echo "${out[@]}"
}
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
updated=""
install() {
  local recommends=$1; shift
  [ $# -gt 0 ] || return 0
  echo "setup: installing $*" >&2
  [ -n "$updated" ] || { $SUDO apt-get update -qq; updated=1; }
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $recommends "$@" >/dev/null
}
# shellcheck disable=SC2046
install "" $(missing "${PKGS[@]}")
# shellcheck disable=SC2046
install --no-install-recommends $(missing "${GUEST_PKGS[@]}")
# npm ci only when the lock file changed since the last install.
stamp=node_modules/.vtpm-lock-stamp
if [ ! -f "$stamp" ] || ! cmp -s package-lock.json "$stamp"; then
  echo "setup: npm ci" >&2
  npm ci --no-audit --no-fund --loglevel=error 2>&1 | grep -v 'Unknown user config' >&2 || true
  [ -d node_modules/koffi ] || { echo "setup: npm ci failed" >&2; exit 1; }
  cp package-lock.json "$stamp"
fi
