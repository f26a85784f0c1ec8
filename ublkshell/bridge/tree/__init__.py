"""The FUSE stats tree (default /mnt/ublkstats)."""
