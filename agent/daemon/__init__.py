"""The agent daemon (`iobridge run`, `iobridge status`): its config, the
decision loop over the kernel runtime, and systemd notification."""
