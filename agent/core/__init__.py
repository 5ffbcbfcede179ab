"""The pure core: the ABI mirror, the feature schema, the decision rule, the
model and its checks. No BPF, no devices, no processes: everything here runs
on any host and is what the daemon, the replay simulator and the tests
share. Imports nothing from the other layers."""
