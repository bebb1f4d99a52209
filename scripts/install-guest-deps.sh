#!/usr/bin/env bash
# Host packages the real-guest layer (emu/guest, tests/test_guest_boot.py) needs:
# QEMU microvm, qemu-storage-daemon (the reference vhost-user-blk backend) and the C
# virtiofsd at /usr/lib/qemu/virtiofsd (the reference virtio-fs backend; both ship in
# qemu-system-common), the dpkg/apt tools used to fetch guest kernels and busybox into
# emu's cache; cpio(1) only as an independent reader of emu's own cpio writer in the
# tests; iproute2 (ip) for the host TAP that tests/test_guest_emu.py has a guest ping;
# nbdkit, the NBD server that tests/test_nbd_engine.py and bench/nbd.py start as remote
# storage.
# Idempotent: installs only what is missing; never fails the caller's job.
set -uo pipefail

want=(qemu-system-x86 qemu-system-common qemu-utils cpio dpkg apt iproute2 nbdkit)
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
((${#missing[@]})) || exit 0

SUDO=
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "install-guest-deps: need root for: ${missing[*]}" >&2; exit 0; }
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq || true
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" \
  || echo "install-guest-deps: could not install: ${missing[*]} (guest boot and NBD tests will skip)" >&2
exit 0
