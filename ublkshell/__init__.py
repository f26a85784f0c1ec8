"""ublkshell: serve, watch and break Linux ublk block devices.

`ublkshell.device("mem", size="1G")` adds a device from Python (ublkshell/api.py)."""
__version__ = "0.1.0"

from .api import Device, device  # noqa: E402,F401
