"""The interactive shell: a client of `ublkshell serve` (shell.run)."""
