"""`add --io-mode`, `--coalesce` and `--zero-copy` without a kernel: the ADD_DEV flags for
what a kernel offers, and the one-line refusals. (Serving IO: tests/vm/test_io_modes.py and
tests/vm/test_zero_copy.py.)"""
import pytest

from ublkshell._native import lib
from ublkshell.devices.io_modes import io_mode_flags, io_mode_of, zero_copy_flags, zero_copy_of
from ublkshell.devices.targets import build_spec
from ublkshell.errors import UblkError, UsageError

OLD_KERNEL = lib.UBLK_F_CMD_IOCTL_ENCODE | lib.UBLK_F_USER_RECOVERY  # offers no batch IO
NEW_KERNEL = OLD_KERNEL | lib.UBLK_F_BATCH_IO | lib.UBLK_F_AUTO_BUF_REG | lib.UBLK_F_USER_COPY


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


ZC = lib.UBLK_F_AUTO_BUF_REG | lib.UBLK_F_USER_COPY


def test_zero_copy_auto_is_where_it_pays():
    assert zero_copy_flags("auto", NEW_KERNEL, True) == ZC
    assert zero_copy_flags("auto", NEW_KERNEL, False) == 0
    # on and fallback do not ask whether it pays
    assert zero_copy_flags("on", NEW_KERNEL, False) == ZC
    assert zero_copy_flags("fallback", NEW_KERNEL, False) == ZC
    assert zero_copy_flags("off", NEW_KERNEL, True) == 0
    assert zero_copy_flags("auto", OLD_KERNEL, True) == 0
    # both or neither: without user copy a faulted IO could not see its data
    assert zero_copy_flags("auto", OLD_KERNEL | lib.UBLK_F_AUTO_BUF_REG, True) == 0
    for mode in ("on", "fallback"):
        with pytest.raises(UblkError, match="UBLK_F_AUTO_BUF_REG.*--zero-copy auto or off"):
            zero_copy_flags(mode, OLD_KERNEL, True)
    assert zero_copy_of(ZC | lib.UBLK_F_BATCH_IO) and not zero_copy_of(lib.UBLK_F_BATCH_IO)


def test_zero_copy_pays_for_loop_outside_ram_only(tmp_path):
    from ublkshell.devices.targets import make_target
    f = tmp_path / "disk.img"
    f.write_bytes(b"\0" * (1 << 20))
    loop = make_target(build_spec("loop", file=str(f)))
    loop.open()
    try:
        assert loop.zero_copy_pays() == (not loop.in_memory)
    finally:
        loop.close()
    assert not make_target(build_spec("mem", size="1M")).zero_copy_pays()
    assert not make_target(build_spec("null", size="1M")).zero_copy_pays()


@pytest.mark.parametrize("target,kw,msg", [
    ("mem", {"zero_copy": "yes"}, "unknown mode"),
    ("null", {"zero_copy": "on"}, "makes its data in the daemon; zero copy is for targets that move it \\(.*loop"),
    ("pattern", {"zero_copy": "fallback"}, "makes its data"),
    ("mem", {"zero_copy": "on", "transport": "fuse"}, "FUSE"),
    ("mem", {"zero_copy": "fallback", "transport": "fuse"}, "FUSE"),
])
def test_bad_zero_copy_is_a_usage_error(target, kw, msg):
    with pytest.raises(UsageError, match=msg):
        build_spec(target, size="1G", **kw)


def test_spec_carries_zero_copy():
    assert build_spec("mem", size="1G", zero_copy="on", powercut=True)["zero_copy"] == "on"
    assert build_spec("null", size="1G")["zero_copy"] == "auto"
    # off is what the FUSE transport does anyway
    assert "zero_copy" not in build_spec("mem", size="1G", transport="fuse", zero_copy="off")


def test_zero_copy_loop_on_a_direct_store_asks_for_its_alignment(tmp_path):
    from ublkshell._native import ffi
    from ublkshell.devices.targets import make_target
    f = tmp_path / "disk.img"
    f.write_bytes(b"\0" * (1 << 20))
    loop = make_target(build_spec("loop", file=str(f)))
    loop.size, loop.block_size = 1 << 20, 4096
    for direct, zero_copy, want in [(True, True, 4095), (True, False, None), (False, True, None)]:
        loop.direct = direct
        p = ffi.new("struct ublk_params *")
        loop.fill_params(p, 1 << 20, zero_copy=zero_copy)
        got = p.dma.alignment if p.types & lib.UBLK_PARAM_TYPE_DMA_ALIGN else None
        assert got == want, (direct, zero_copy, got)
    loop.block_size = 512
    p = ffi.new("struct ublk_params *")
    loop.direct = True
    loop.fill_params(p, 1 << 20, zero_copy=True)
    assert p.dma.alignment == 511
