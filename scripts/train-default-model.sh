#!/bin/bash
# Rebuild models/admission-default.onnx (and its card) the way it was built:
# record a bio-level trace in the test VM (vm/record-training.py), then train
# on the host with `iobridge train`. About 3 minutes under emulation.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/iobridge-train-XXXXXX)
trace="$work/vm-slow-leg.parquet"
.venv/bin/iobridge vm run --timeout 900 --share "$work" -- python vm/record-training.py "$trace"
.venv/bin/iobridge trace info "$trace"
# Label thresholds between the fast mode (< 1 ms even at queue depth 16) and
# the slow one (>= 4 ms): the knee of the raw distribution falls inside the
# fast mode on these traces. fio is a closed-loop client at fixed depths, so
# throughput is compared within queue-length classes (see `iobridge train --help`).
.venv/bin/iobridge train --trace "$trace" --out "${1:-models/admission-default.onnx}" \
    --lat-threshold-us 2000 --tput-threshold 0.2 --group-by-qlen
echo "trace kept in $trace"
