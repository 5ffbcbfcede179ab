#!/bin/bash
# Runs first inside the test VM (as root): mounts what BPF and the test
# fixtures need, puts the project's venv first on PATH, then runs the command.
# Usage: guest-prelude.sh VENV_PREFIX CMD [ARGS...]
set -u
venv=$1; shift
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
modprobe configfs 2>/dev/null
mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config
mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
ulimit -l unlimited
export IOBRIDGE_IN_VM=1
export PATH="$venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
export PYTHONDONTWRITEBYTECODE=1
exec "$@"
