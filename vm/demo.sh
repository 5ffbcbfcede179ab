#!/bin/bash
# `make demo`, inside the test VM: the learned admission policy end to end.
# Loads the module (built on the host by `make module`), builds a two-leg
# iobridge target whose second leg goes through slow periods (dm-delay
# reloaded on a seeded random schedule), and runs fio 4 KiB random reads at
# queue depth 1 and 16 under (a) the module default, (b) round robin and
# (c) the agent (`iobridge run`) with the shipped model; prints the read
# latencies side by side and the ratio of (c) to the best of (a) and (b).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== kernel $(uname -r); model models/admission-default.onnx"
exec iobridge bench agent --in-vm --latency-only "$@"
