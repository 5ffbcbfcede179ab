"""The kernel-facing runtime: host preflight checks, the one BPF loader, the
block observer and the leg feature state it keeps, the routing program, the
dm target's control interface, and pinned objects. Imports only the core."""
