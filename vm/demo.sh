#!/bin/bash
# `make demo`, inside the test VM: a block device with a 1 ms service time,
# fio random reads and writes on it, and the BPF observer's live figures
# and final summary beside fio's own.
set -euo pipefail
cd "$(dirname "$0")/.."
dev_name=demo_nullb
cfg=/sys/kernel/config/nullb/$dev_name
out=$(mktemp -d)

cleanup() {
  [ -n "${obs_pid:-}" ] && kill -TERM "$obs_pid" 2>/dev/null || true
  if [ -d "$cfg" ]; then echo 0 > "$cfg/power"; rmdir "$cfg"; fi
}
trap cleanup EXIT

echo "== kernel $(uname -r); creating /dev/$dev_name (null_blk, 256 MiB, 1 ms completions)"
modprobe null_blk nr_devices=0
mkdir "$cfg"
echo 256 > "$cfg/size"; echo 1 > "$cfg/memory_backed"
echo 2 > "$cfg/irqmode"; echo 1000000 > "$cfg/completion_nsec"
echo 1 > "$cfg/power"
udevadm settle 2>/dev/null || sleep 1

echo "== starting the observer (BCC compiles the BPF program first)"
iobridge observe --dev "$dev_name" --interval 2 >"$out/observe.txt" 2>"$out/observe.err" &
obs_pid=$!
tail -f "$out/observe.txt" --pid "$obs_pid" &
for _ in $(seq 600); do
  grep -q attached "$out/observe.err" 2>/dev/null && break
  kill -0 "$obs_pid" 2>/dev/null || { cat "$out/observe.err" >&2; exit 1; }
  sleep 0.2
done
cat "$out/observe.err"

echo "== fio: 4 KiB random reads/writes (70/30), queue depth 8, 12 s"
fio --name=demo --filename="/dev/$dev_name" --rw=randrw --rwmixread=70 --bs=4k --direct=1 \
    --ioengine=libaio --iodepth=8 --runtime=12 --time_based --randrepeat=0 \
    --output-format=json >"$out/fio.json"
sleep 2.5
kill -TERM "$obs_pid"; wait "$obs_pid"; obs_pid=
sleep 0.2

python3 - "$out/fio.json" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
print("\n== fio's own view (completion latency, user space):")
for op in ("read", "write"):
    d = job[op]; p = d["clat_ns"]["percentile"]
    print(f"   {op:5}: {d['total_ios']} I/Os, {d['iops']:.0f} IOPS, "
          f"p50 {p['50.000000']/1e3:.1f} us, p99 {p['99.000000']/1e3:.1f} us")
print("   The observer's summary above counts the same I/Os from the block layer "
      "(issue -> completion).")
PY
