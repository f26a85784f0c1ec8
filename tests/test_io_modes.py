"""`add --io-mode` and `--coalesce` without a kernel: the mode's ADD_DEV flags for what a
kernel offers, and the one-line refusals. (Both modes serving IO: tests/vm/test_io_modes.py.)"""
import pytest

from ublkshell._native import lib
from ublkshell.devices.io_modes import io_mode_flags, io_mode_of
from ublkshell.devices.targets import build_spec
from ublkshell.errors import UblkError, UsageError

OLD_KERNEL = lib.UBLK_F_CMD_IOCTL_ENCODE | lib.UBLK_F_USER_RECOVERY  # offers no batch IO
NEW_KERNEL = OLD_KERNEL | lib.UBLK_F_BATCH_IO


def test_auto_takes_batch_where_offered():
    assert io_mode_flags("auto", NEW_KERNEL) == lib.UBLK_F_BATCH_IO
    assert io_mode_flags("auto", OLD_KERNEL) == 0
    assert io_mode_flags("per-tag", NEW_KERNEL) == 0
    # the driver refuses batch IO at depth 1: auto falls back, batch says so
    assert io_mode_flags("auto", NEW_KERNEL, 1) == 0
    with pytest.raises(UblkError, match="depth 2 or more"):
        io_mode_flags("batch", NEW_KERNEL, 1)
    assert io_mode_of(lib.UBLK_F_BATCH_IO | lib.UBLK_F_USER_RECOVERY) == "batch"
    assert io_mode_of(lib.UBLK_F_USER_RECOVERY) == "per-tag"


def test_batch_on_a_kernel_without_it_names_the_way_out():
    with pytest.raises(UblkError) as e:
        io_mode_flags("batch", OLD_KERNEL)
    assert "UBLK_F_BATCH_IO" in str(e.value) and "--io-mode per-tag" in str(e.value)


@pytest.mark.parametrize("kw,msg", [
    ({"io_mode": "sideways"}, "unknown mode"),
    ({"io_mode": "batch", "transport": "fuse"}, "FUSE"),
    ({"io_mode": "per-tag", "transport": "fuse"}, "FUSE"),
    ({"io_mode": ""}, "unknown mode"),
    ({"coalesce_ns": 1500}, "whole number of microseconds"),
    ({"coalesce_ns": 1000, "transport": "fuse"}, "FUSE"),
])
def test_bad_modes_are_usage_errors(kw, msg):
    with pytest.raises(UsageError, match=msg):
        build_spec("null", size="1G", **kw)


def test_spec_carries_mode_and_coalesce():
    spec = build_spec("null", size="1G", io_mode="per-tag", coalesce_ns=250_000)
    assert spec["io_mode"] == "per-tag" and spec["coalesce_us"] == 250
    assert "coalesce_us" not in build_spec("null", size="1G")
    assert "io_mode" not in build_spec("null", size="1G", transport="fuse")
