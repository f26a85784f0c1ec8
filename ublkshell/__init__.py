"""ublkshell: serve, watch and break Linux ublk block devices."""
__version__ = "0.1.0"
