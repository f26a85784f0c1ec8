"""The kernel's side: ublk UAPI constants, control commands, mount table."""
