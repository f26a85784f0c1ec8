"""ublkshell: serve, watch and break Linux ublk block devices.

`ublkshell.device("mem", size="1G")` adds a device from Python (ublkshell/api.py)."""
__version__ = "0.1.0"
__all__ = ["Device", "device"]


def __getattr__(name):
    # imported on first use: every CLI command and IO daemon imports this package, and
    # most never touch the API (its imports cost start-up time, dear under emulation)
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'ublkshell' has no attribute {name!r}")
