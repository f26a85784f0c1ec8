"""Zero copy (`add --zero-copy`) on the real driver: the kernel registers each
READ's and WRITE's pages with the queue's ring and loop and mem move them with
fixed-buffer IO, in both IO modes; the IOs whose data must pass through the
daemon (a corrupt fault, the driver's fallback) take the copy path on the same
device. (The rest of the VM suite runs in the default, auto, which is zero copy
for loop on ext4 on this kernel, so its fault, recovery and filesystem tests on
such devices run zero copy too.)"""
import errno
import json
import mmap
import os

import pytest

from .conftest import cli, pattern, pread_direct, pwrite_direct
from .test_consumers import fio_verify

KB = 1024
MODES = ["batch", "per-tag"]


def stats(dev):
    return json.loads(cli("stats", str(dev["id"]), "--json").stdout)


def listed(dev):
    return {d["id"]: d for d in json.loads(cli("list", "--json").stdout)}[dev["id"]]


# each IO mode on each target once (the fallback test runs both modes on loop again)
@pytest.mark.parametrize("target,bs,mode", [("mem", "4k", "per-tag"), ("loop", "128k", "batch")])
def test_verify_zero_copy(devices, backing, mode, target, bs):
    extra = ("-q", "2", "--io-mode", mode, "--zero-copy", "on")
    if target == "mem":
        dev = devices.add("-t", "mem", "--size", "64M", *extra)
    else:
        dev = devices.add("-t", "loop", "-f", backing.make("ext4", 64 << 20), *extra)
    assert dev["zero_copy"] and dev["io_mode"] == mode
    flags = listed(dev)["flags"]
    assert "auto_buf_reg" in flags and "user_copy" in flags, flags
    p = fio_verify(dev["path"], bs, size="8M", extra=("--numjobs=2", "--offset_increment=32M",
                                                         "--group_reporting"))
    assert p.stdout.strip().splitlines()[-1].split(";")[4] == "0", p.stdout
    s = stats(dev)
    assert s["ring"]["committed"] == sum(o["ios"] for o in s["ops"].values()) > 0, s["ring"]
    # no IO needed its data in the daemon
    assert s["ring"]["copied"] == 0, s["ring"]


@pytest.mark.parametrize("mode", MODES)
def test_bytes_reach_the_file_and_come_back(devices, backing, mode):
    """What a zero-copy WRITE moves is in the backing file, and a READ brings the
    file's bytes (not a buffer of the daemon's): checked against the file itself."""
    path = backing.make("ext4", 16 << 20)
    on_disk = pattern(256 * KB, 7)
    with open(path, "r+b") as f:
        f.seek(1 << 20)
        f.write(on_disk)
    dev = devices.add("-t", "loop", "-f", path, "--io-mode", mode, "--zero-copy", "on")
    assert pread_direct(dev["path"], 256 * KB, 1 << 20) == on_disk
    # a read not aligned to the page, and one that is a single sector
    assert pread_direct(dev["path"], 512, (1 << 20) + 3 * 512) == on_disk[3 * 512:4 * 512]
    # the client's own pages reach the O_DIRECT file: the device asks for its alignment,
    # as a disk does, instead of the driver's 4 bytes
    with open(f"/sys/block/ublkb{dev['id']}/queue/dma_alignment") as f:
        align = int(f.read())
    assert align >= 511, align
    fd = os.open(dev["path"], os.O_RDONLY | os.O_DIRECT)
    try:
        buf = memoryview(mmap.mmap(-1, 3 * 4096))
        assert os.preadv(fd, [buf[align + 1:align + 1 + 4096]], 1 << 20) == 4096
        assert bytes(buf[align + 1:align + 1 + 4096]) == on_disk[:4096]
        with pytest.raises(OSError) as e:
            os.preadv(fd, [buf[16:16 + 4096]], 1 << 20)
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    new = pattern(128 * KB, 8)
    pwrite_direct(dev["path"], new, 4 << 20)
    assert stats(dev)["ring"]["copied"] == 0
    cli("del", str(dev["id"]))
    with open(path, "rb") as f:
        f.seek(4 << 20)
        assert f.read(128 * KB) == new


@pytest.mark.parametrize("mode", MODES)
def test_fallback_copies_every_io(devices, backing, mode):
    """--zero-copy fallback: every registration fails, so every READ and WRITE comes
    flagged NEED_REG_BUF and takes the copy path; the data is still right."""
    dev = devices.add("-t", "loop", "-f", backing.make("ext4", 64 << 20), "--io-mode", mode,
                      "--zero-copy", "fallback")
    assert dev["zero_copy"]
    p = fio_verify(dev["path"], "64k", size="8M")
    assert p.stdout.strip().splitlines()[-1].split(";")[4] == "0", p.stdout
    s = stats(dev)
    data_ios = s["ops"]["read"]["ios"] + s["ops"]["write"]["ios"]
    assert s["ring"]["copied"] == data_ios > 0, (s["ring"], data_ios)


@pytest.mark.parametrize("target,mode", [("loop", "batch"), ("loop", "per-tag"), ("mem", "batch")])
def test_corrupt_takes_the_copy_path(devices, backing, mode, target):
    """A corrupt fault must see the data: those IOs are copied, the rest stay zero copy."""
    extra = ("--io-mode", mode, "--zero-copy", "on")
    if target == "mem":
        dev = devices.add("-t", "mem", "--size", "16M", *extra)
    else:
        dev = devices.add("-t", "loop", "-f", backing.make("ext4", 16 << 20), *extra)
    data = pattern(8 * KB, 9)
    pwrite_direct(dev["path"], data, 0)
    cli("corrupt", str(dev["id"]), "lba", "0..15", "op=read", "byte=5", "count=1")
    got = pread_direct(dev["path"], 8 * KB, 0)
    assert [i for i in range(len(data)) if got[i] != data[i]] == [5]
    # count=1: the next read is zero copy again, and whole
    assert pread_direct(dev["path"], 8 * KB, 0) == data
    cli("corrupt", str(dev["id"]), "lba", "16", "op=write", "byte=9", "count=1")
    pwrite_direct(dev["path"], data, 8 * KB)
    got = pread_direct(dev["path"], 8 * KB, 8 * KB)
    assert [i for i in range(len(data)) if got[i] != data[i]] == [9]
    # exactly the two IOs the rules edited were copied
    assert stats(dev)["ring"]["copied"] == 2
    assert "2 IOs copied" in cli("stats", str(dev["id"])).stdout


def test_recovered_daemon_keeps_zero_copy(devices):
    dev = devices.add("-t", "mem", "--size", "16M", "--recovery", "--zero-copy", "on")
    pwrite_direct(dev["path"], pattern(64 * KB, 10), 0)
    for _ in range(2):
        cli("kill", str(dev["id"]))
        cli("recover", str(dev["id"]))
        assert pread_direct(dev["path"], 64 * KB, 0) == pattern(64 * KB, 10)
    assert "auto_buf_reg" in listed(dev)["flags"]
    # the recovered daemons registered the pages again: nothing fell back to copying
    assert stats(dev)["ring"]["copied"] == 0
    p = fio_verify(dev["path"], "4k", size="8M")
    assert p.stdout.strip().splitlines()[-1].split(";")[4] == "0", p.stdout


def test_auto_is_zero_copy_for_loop_outside_ram(devices, backing):
    ext4 = devices.add("-t", "loop", "-f", backing.make("ext4", 16 << 20))
    tmpfs = devices.add("-t", "loop", "-f", backing.make("tmpfs", 16 << 20))
    null = devices.add("-t", "null", "--size", "1G")
    mem = devices.add("-t", "mem", "--size", "16M")
    off = devices.add("-t", "loop", "-f", backing.make("ext4", 16 << 20, "off.img"), "--zero-copy", "off")
    devs = (ext4, tmpfs, null, mem, off)
    assert [d["zero_copy"] for d in devs] == [True, False, False, False, False]
    assert ["auto_buf_reg" in listed(d)["flags"] for d in devs] == [True, False, False, False, False]


def test_powercut_on_zero_copy(devices):
    """The power-cut log keeps what a write overwrites, read from the store: a zero-copy
    device keeps its zero copy and loses exactly its unflushed writes."""
    dev = devices.add("-t", "mem", "--size", "16M", "--recovery", "--powercut", "--zero-copy", "on")
    assert dev["zero_copy"]
    a, b = pattern(16 * KB, 11), pattern(16 * KB, 12)
    pwrite_direct(dev["path"], a, 0)
    fd = os.open(dev["path"], os.O_RDWR)
    os.fsync(fd)
    os.close(fd)
    pwrite_direct(dev["path"], b, 0)
    assert stats(dev)["ring"]["copied"] == 0
    r = json.loads(cli("powercut", str(dev["id"]), "--json", timeout=120).stdout)
    assert r["dropped"] == 1, r
    cli("recover", str(dev["id"]), timeout=120)
    assert pread_direct(dev["path"], 16 * KB, 0) == a
