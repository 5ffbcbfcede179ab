"""The test lab: the QEMU VM harness, replica testbeds, fault injection,
fio workloads, and the benchmark and demo harness. Needs a source checkout."""
