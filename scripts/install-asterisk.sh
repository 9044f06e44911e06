#!/usr/bin/env bash
# Install a real Asterisk 22 (Debian sid's package) in a debootstrap chroot, plus the host tools
# the tests and demo use (SIPp, flite). Idempotent: a finished root is reused.
# Facts behind each step: ../shared/FIELD-NOTES.md ("A real Asterisk 22 for tests and the demo").
set -euo pipefail

ROOT="${CALLBRIDGE_ASTERISK_ROOT:-/var/lib/callbridge/asterisk-root}"
STAMP="$ROOT/.callbridge-ready"

log() { printf '[install-asterisk] %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  log "must run as root (debootstrap and chroot need it)"; exit 1
fi

host_packages=(debootstrap sip-tester flite sox)
missing=()
for p in "${host_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing host packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ -f "$STAMP" ]; then
  log "Asterisk root ready at $ROOT"; exit 0
fi

if [ ! -x "$ROOT/usr/bin/apt-get" ]; then
  log "debootstrap sid into $ROOT (about 30 s)"
  rm -rf "$ROOT"; mkdir -p "$(dirname "$ROOT")"
  debootstrap --variant=minbase sid "$ROOT" >/dev/null
fi

# The archive is a frozen snapshot: its Release file may have "expired".
echo 'Acquire::Check-Valid-Until "false";' > "$ROOT/etc/apt/apt.conf.d/99callbridge-no-expiry"
# Packages must not try to start services inside the chroot.
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"; chmod +x "$ROOT/usr/sbin/policy-rc.d"

# Unmount /proc afterwards only if we mounted it: a running lab instance may need it.
if ! mountpoint -q "$ROOT/proc"; then
  mount -t proc proc "$ROOT/proc"
  trap 'umount "$ROOT/proc" 2>/dev/null || true' EXIT
fi

log "installing asterisk in the chroot (about 15 s)"
chroot "$ROOT" apt-get update -qq
chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  asterisk asterisk-modules asterisk-core-sounds-en >/dev/null
chroot "$ROOT" apt-get clean
# Asterisk looks its host name up for every new RTP instance: resolve it locally, never by DNS.
[ -e "$ROOT/etc/hosts" ] || printf '127.0.0.1 localhost\n127.0.0.1 %s\n::1 localhost\n' "$(hostname)" > "$ROOT/etc/hosts"
chroot "$ROOT" /usr/sbin/asterisk -V
touch "$STAMP"
log "Asterisk root ready at $ROOT"
