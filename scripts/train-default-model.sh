#!/bin/bash
# Rebuild models/admission-default.onnx (and its card) the way it was built:
# record a bio-level trace of three legs of different speeds in the test VM
# (vm/record-training.py), then train on the host with `iobridge train`.
# About 15 minutes in the VM under emulation, then a few minutes of training.
# Usage: scripts/train-default-model.sh [OUT.onnx]   (default models/admission-default.onnx)
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/iobridge-train-XXXXXX)
trace="$work/vm-legs.parquet"
.venv/bin/iobridge vm run --timeout 2400 --share "$work" -- \
    python vm/record-training.py "$trace"
.venv/bin/iobridge trace info "$trace"
# Labels relative to each leg's own baseline (the feature schema's): a slow
# period may start at a latency above 8 x the leg's baseline, so one
# threshold suits the 50 us, 250 us and 2 ms legs alike (a threshold in us
# would call every read of the 2 ms leg slow). Throughput is compared within
# queue-length classes, because fio is a closed-loop client at fixed depths
# (see `iobridge train --help`).
.venv/bin/iobridge train --force --trace "$trace" --out "${1:-models/admission-default.onnx}" \
    --lat-threshold-rel 8 --tput-threshold 0.2 --group-by-qlen \
    --note "recorded by vm/record-training.py in the test VM: legs of 50 us, 250 us and 2 ms (null_blk), slow periods +1/6/24 ms, fio queue depths 1/4/16/32, 4 KiB or mixed sizes"
echo "trace kept in $trace (slow-period timeline beside it: ${trace%.parquet}.phases.json)"
