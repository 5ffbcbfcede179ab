#!/usr/bin/env bash
# One-time (idempotent) setup on Debian 12: system packages, the VM's Debian
# kernel images and headers (the 6.1 and 6.12 lines), and the project's venv.
# A second run only checks, and takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# Debian packages and why: see README "Dependencies".
PACKAGES=(
  python3 python3-venv python3-pip python3-bpfcc bpftool libbpf-dev clang llvm
  gcc make libelf-dev kmod dmsetup fio rocksdb-tools zstd qemu-system-x86 busybox-static udev
  util-linux procps systemd dbus
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

# --- the VM kernels: pinned in vm/kernel-release, one per line --------------
# For each pinned release: install it, or, when the archive has dropped that
# ABI after security updates, the newest of the same line (6.1.0-N-amd64, or
# 6.12.N+deb12-amd64), recorded with the others in vm/kernel-release.local.
line_pattern() {   # the apt name pattern of a release's line
  case "$1" in
    6.1.0-*-amd64) echo '^linux-headers-6\.1\.0-[0-9]+-amd64$' ;;
    6.12.*+deb12-amd64) echo '^linux-headers-6\.12\.[0-9]+\+deb12-amd64$' ;;
    *) die "vm/kernel-release: $1 is not a Debian 12 6.1 or 6.12 amd64 release" ;;
  esac
}
pinned=$(sed 's/#.*//' vm/kernel-release | awk 'NF {print $1}')
[ -n "$pinned" ] || die "vm/kernel-release names no kernel release"
releases=(); fell_back=
for release in $pinned; do
  pattern=$(line_pattern "$release")
  if ! installed "linux-image-${release}-unsigned" || ! installed "linux-headers-${release}"; then
    if ! available "linux-image-${release}-unsigned" || ! available "linux-headers-${release}"; then
      newest=$(apt-cache search --names-only "$pattern" | awk '{print $1}' \
               | sed 's/linux-headers-//' | sort -V | tail -n1)
      [ -n "$newest" ] || die "no Debian kernel package of ${release}'s line in the apt sources (is bookworm in sources.list?)"
      say "warning: pinned kernel $release is no longer in the archive; using $newest (recorded in vm/kernel-release.local; update vm/kernel-release)"
      release=$newest; fell_back=1
    fi
  fi
  releases+=("$release")
done
if [ -n "$fell_back" ]; then
  printf '%s\n' "${releases[@]}" > vm/kernel-release.local
else
  rm -f vm/kernel-release.local   # the pinned kernels are installed: use them
fi

missing=()
for p in "${PACKAGES[@]}"; do
  installed "$p" || missing+=("$p")
done
for release in "${releases[@]}"; do
  for p in "linux-image-${release}-unsigned" "linux-headers-${release}"; do
    installed "$p" || missing+=("$p")
  done
done
if [ ${#missing[@]} -gt 0 ]; then
  apt_update
  say "installing ${missing[*]}"
  # The VM kernels are installed on this host only so that virtme-ng can boot
  # them (/boot, /lib/modules); they do not become the host's boot default
  # unless a bootloader is configured to pick one.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" \
    >/tmp/iobridge-apt.log 2>&1 || { tail -20 /tmp/iobridge-apt.log >&2; die "apt-get install failed (log: /tmp/iobridge-apt.log)"; }
fi
for release in "${releases[@]}"; do
  [ -e "/boot/vmlinuz-$release" ] || die "/boot/vmlinuz-$release is missing after installing linux-image-${release}-unsigned"
  [ -e "/lib/modules/$release/build/Makefile" ] || die "headers for $release missing after installing linux-headers-${release}"
done

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
say "ready: kernels ${releases[*]}, $(.venv/bin/python --version), $(.venv/bin/vng --version 2>/dev/null)"
