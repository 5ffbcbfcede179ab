#!/bin/bash
# `make demo`, inside the test VM: the learned admission policy end to end.
# Loads the module (built on the host by `make module`), builds a two-leg
# iobridge target whose second leg goes through slow periods (dm-delay
# reloaded on a seeded random schedule), and runs fio 4 KiB random reads at
# queue depth 1 and 16 under (a) the module default, (b) round robin and
# (c) the agent (`iobridge run`) with the shipped model; prints the module
# default's QD1 IOPS (how fast this machine is), the read latencies side by
# side, the ratio of (c) to the best of (a) and (b), the share of reads the
# kernel routed from the agent's table, and writes a read-latency CDF per
# queue depth to a PNG under .scratch/demo/ (the repository is shared with
# the host), whose path it prints last. Extra arguments go to
# `iobridge bench agent`, e.g. --output-dir DIR or --runtime 30.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== kernel $(uname -r); model models/admission-default.onnx"
exec iobridge bench agent --in-vm --latency-only "$@"
