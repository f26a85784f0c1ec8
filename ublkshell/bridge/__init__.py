"""Processes and state behind the faces: device daemons and their registry."""
