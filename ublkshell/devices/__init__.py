"""Devices: the spec, targets, add/delete/list, recovery, the FUSE transport, ids, the registry."""
