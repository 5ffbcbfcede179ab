#!/usr/bin/env bash
# One-time (idempotent) setup on Debian 12: system packages, the VM's Debian
# 6.1 kernel image and headers, and the project's venv. A second run only
# checks, and takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# Debian packages and why: see README "Dependencies".
PACKAGES=(
  python3 python3-venv python3-pip python3-bpfcc bpftool libbpf-dev clang llvm
  gcc make libelf-dev kmod dmsetup fio zstd qemu-system-x86 busybox-static udev
  util-linux procps
)

if [ -r /etc/os-release ]; then
  . /etc/os-release
  if [ "${ID:-}" != debian ] || [ "${VERSION_ID:-}" != 12 ]; then
    say "warning: this is ${PRETTY_NAME:-an unknown system}; iobridge is set up and tested on Debian 12"
  fi
fi
command -v apt-get >/dev/null || die "apt-get not found: setup needs Debian 12 (bookworm)"

SUDO=
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || die "setup installs Debian packages: run it as root or install sudo"
  SUDO=sudo
fi

apt_updated=
apt_update() {
  if [ -z "$apt_updated" ]; then
    say "apt-get update"
    $SUDO apt-get update -q >/dev/null || die "apt-get update failed (network or sources.list?)"
    apt_updated=1
  fi
}
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
available() { apt_update; [ -n "$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ && $2 != "(none)"')" ]; }

# --- the VM kernel: pinned in vm/kernel-release ----------------------------
release=$(awk 'NF {print $1; exit}' vm/kernel-release)
image="linux-image-${release}-unsigned"
headers="linux-headers-${release}"
if ! installed "$image" || ! installed "$headers"; then
  if ! available "$image" || ! available "$headers"; then
    # The archive drops old ABIs after security updates: take the newest 6.1.
    newest=$(apt-cache search --names-only '^linux-headers-6\.1\.0-[0-9]+-amd64$' \
             | awk '{print $1}' | sed 's/linux-headers-//' | sort -V | tail -n1)
    [ -n "$newest" ] || die "no Debian 6.1 kernel package in the apt sources (is bookworm in sources.list?)"
    say "warning: pinned kernel $release is no longer in the archive; using $newest (recorded in vm/kernel-release.local; update vm/kernel-release)"
    release=$newest; image="linux-image-${release}-unsigned"; headers="linux-headers-${release}"
    echo "$release" > vm/kernel-release.local
  fi
else
  rm -f vm/kernel-release.local   # the pinned kernel is installed: use it
fi

missing=()
for p in "${PACKAGES[@]}" "$image" "$headers"; do
  installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt_update
  say "installing ${missing[*]}"
  # The VM kernel is installed on this host only so that virtme-ng can boot
  # it (/boot, /lib/modules); it does not become the host's boot default
  # unless a bootloader is configured to pick it.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" \
    >/tmp/iobridge-apt.log 2>&1 || { tail -20 /tmp/iobridge-apt.log >&2; die "apt-get install failed (log: /tmp/iobridge-apt.log)"; }
fi
[ -e "/boot/vmlinuz-$release" ] || die "/boot/vmlinuz-$release is missing after installing $image"
[ -e "/lib/modules/$release/build/Makefile" ] || die "headers for $release missing after installing $headers"

# --- the venv ----------------------------------------------------------------
# Made from Debian's python3 with --system-site-packages so that BCC
# (python3-bpfcc, not on PyPI) imports.
stamp=.venv/.iobridge-setup
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    /usr/bin/python3 -m venv --system-site-packages .venv
  fi
  say "installing the Python package and its dependencies into .venv"
  log=.venv/pip-install.log
  { .venv/bin/python -m pip install --disable-pip-version-check --upgrade 'pip>=23' 'setuptools>=77' wheel &&
    .venv/bin/python -m pip install --disable-pip-version-check -e '.[test,vm,train]'; } >"$log" 2>&1 \
    || { tail -20 "$log" >&2; die "pip install failed (log: $log)"; }
  echo "$want" > "$stamp"
fi
.venv/bin/python -c 'import bcc' 2>/dev/null || die "BCC does not import in .venv (python3-bpfcc installed for another Python?)"
say "ready: kernel $release, $(.venv/bin/python --version), $(.venv/bin/vng --version 2>/dev/null)"
