"""Crash states: dm-log-writes logs (logwrites.py) and replaying them onto a device or an
image, to any entry or mark (replay.py)."""
