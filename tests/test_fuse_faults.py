"""Fault rules, power cut, stats and trace on FUSE devices, on the host, with
the very tests that prove them on ublk in the VM (tests/vm/test_faults.py,
tests/vm/test_powercut.py, tests/vm/test_targets.py): the same functions run
against a FUSE device attached to a real loop device, so both transports are
held to the same assertions by the one IO pipeline they share.

Where a VM test reaches for something only ublk has (its sysfs io_timeout),
the FUSE version here says what differs."""
import errno
import json
import os
import shutil
import sys
import threading
import time

import pytest

from vm import test_faults as vf
from vm import test_powercut as vp
from vm import test_targets as vt
from vm.conftest import Backing, cli, pattern, pread_direct, pwrite_direct
from vm.conftest import run as _run

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control")
    or not shutil.which("losetup") or not shutil.which("mkfs.ext4") or not shutil.which("fio"),
    reason="FUSE devices with loop devices need root, /dev/fuse, the loop driver, losetup, mkfs.ext4, fio")

KB = 1024


def run(argv, *args, **kw):
    """The VM tests' run(), but tools that are not ours never get the sanitizer phase's
    preloaded libasan (scripts/sanitize.sh): dd's own aligned_alloc(4096, 512) trips it."""
    if argv and argv[0] != sys.executable and "LD_PRELOAD" in os.environ:
        kw["env"] = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    return _run(argv, *args, **kw)


@pytest.fixture(autouse=True)
def _plain_tools(monkeypatch):
    for module in (vf, vp):
        monkeypatch.setattr(module, "run", run)


class FuseDevices:
    """The VM tests' `devices`, adding FUSE devices on loop devices instead of ublk ones."""

    def __init__(self):
        self.added = []

    def add(self, *args) -> dict:
        dev = json.loads(cli("add", "--transport", "fuse", "--loop", *args, "--json").stdout)
        self.added.append(dev)
        # the loop device is the block device; the id (a number) is what every verb takes
        dev["path"] = dev["loop"]
        return dev

    def cleanup(self):
        for dev in self.added:
            cli("del", str(dev["id"]), check=False, timeout=60)


@pytest.fixture
def devices(tmp_path_factory, monkeypatch, backing):
    # backing: set up first, so torn down after the devices that hold its files open
    root = str(tmp_path_factory.mktemp("ff"))
    mem = os.path.join(root, "mem")
    os.makedirs(mem, mode=0o700)
    # cli() runs with this environment: the test sees only its own devices
    monkeypatch.setenv("UBLKSHELL_STATE_DIR", os.path.join(root, "state"))
    monkeypatch.setenv("UBLKSHELL_DATA_DIR", mem)
    d = FuseDevices()
    yield d
    d.cleanup()
    left = [dev["loop"] for dev in d.added
            if os.path.exists(f"/sys/block/{os.path.basename(dev['loop'])}/loop/backing_file")
            and root in open(f"/sys/block/{os.path.basename(dev['loop'])}/loop/backing_file").read()]
    assert not left, f"loop devices left behind: {left}"


@pytest.fixture
def scratch(tmp_path_factory):
    d = f"/dev/shm/ublkshell-ff-{os.getpid()}-{time.monotonic_ns()}"
    os.makedirs(d)
    yield d
    run(["rm", "-rf", d])


@pytest.fixture
def backing(scratch):
    b = Backing(scratch)
    yield b
    b.cleanup()


# -- the VM's fault tests, unchanged, on FUSE ------------------------------------------
@pytest.mark.parametrize("target", ["mem", "loop"])
def test_fail_range_only_there(devices, backing, target):
    vf.test_fail_range_only_there(devices, backing, target)


def test_fail_count_and_errno(devices, backing):
    vf.test_fail_count_and_errno(devices, backing)


def test_ext4_goes_read_only_on_write_error(devices, backing, scratch):
    vf.test_ext4_goes_read_only_on_write_error(devices, backing, scratch)


def test_delay_in_histogram_and_fio(devices, backing):
    vf.test_delay_in_histogram_and_fio(devices, backing)


def test_delayed_tag_never_stalls_the_others(devices, backing):
    vf.test_delayed_tag_never_stalls_the_others(devices, backing)


@pytest.mark.parametrize("target", ["mem", "loop"])
def test_dropped_writes_read_back_old(devices, backing, target):
    vf.test_dropped_writes_read_back_old(devices, backing, target)


@pytest.mark.parametrize("target", ["mem", "loop"])
def test_torn_write_keeps_the_first_sectors(devices, backing, target):
    vf.test_torn_write_keeps_the_first_sectors(devices, backing, target)


def test_hang_released_by_del(devices, backing):
    vf.test_hang_released_by_del(devices, backing)


def test_hang_ages_in_inflight_until_cleared(devices, backing):
    # the VM test's first step sets ublk's io_timeout in sysfs; a loop device has no such
    # timer, so the rest of it is here as it is there
    dev = vf._dev(devices, backing, "mem")
    data = pattern(4 * KB, 6)
    pwrite_direct(dev["path"], data, 0)
    rid = vf.rule(dev, "hang", "lba", "0..7", "op=read")
    got = {}
    th = threading.Thread(target=lambda: got.setdefault("data", pread_direct(dev["path"], 4 * KB, 0)))
    th.start()
    time.sleep(3)
    assert th.is_alive()
    tags = json.loads(cli("inflight", str(dev["id"]), "--json").stdout)["tags"]
    (t,) = [t for t in tags if t["fault"]]
    assert t["fault"] == f"hang#{rid}" and t["age_ns"] >= 2.5e9 and t["sector"] == 0
    assert vf.faults(dev)["hung"] == 1
    cli("clear", str(dev["id"]), str(rid))
    th.join(5)
    assert not th.is_alive() and got["data"] == data
    assert vf.faults(dev)["hung"] == 0


def test_badblocks_until_rewritten(devices, backing):
    vf.test_badblocks_until_rewritten(devices, backing, "mem")


# -- power cut ------------------------------------------------------------------------------
def test_powercut_unflushed_lost_flushed_kept(devices, scratch):
    # the VM test's own sequence; a loop device passes FUA on as write + fsync (a FLUSH), so
    # there is no "fua" flag in the trace to look for, and the outcome is the same
    img = vp._file(scratch)
    dev = devices.add("-t", "loop", "-f", img, "--powercut")
    a, b, c, d, e = (pattern(16 * KB, i) for i in range(5))
    fd = os.open(dev["path"], os.O_RDWR | os.O_DIRECT)
    try:
        vp._write(fd, a, 0)
        os.fsync(fd)                      # FLUSH: a is durable
        vp._write(fd, b, 0)               # overwrites a, never flushed
        vp._write(fd, c, 1 << 20)         # never flushed
    finally:
        os.close(fd)
    fd = os.open(dev["path"], os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
    try:
        vp._write(fd, d, 2 << 20)         # and a flush after it: b, c and d are durable
    finally:
        os.close(fd)
    fd = os.open(dev["path"], os.O_RDWR | os.O_DIRECT)
    try:
        vp._write(fd, e, 0)               # overwrites b, never flushed
        vp._write(fd, e, 3 << 20)         # never flushed
    finally:
        os.close(fd)
    r = vp.powercut(dev)
    assert r["dropped"] == 2 and r["dropped_bytes"] == 32 * KB, r
    assert vp._read_file(img, 0, 16 * KB) == b
    assert vp._read_file(img, 1 << 20, 16 * KB) == c
    assert vp._read_file(img, 2 << 20, 16 * KB) == d
    assert vp._read_file(img, 3 << 20, 16 * KB) == bytes(16 * KB)
    # the daemon died as in a crash: the FUSE connection is gone, IO fails, `del` cleans up
    p = run(["dd", f"if={dev['path']}", "of=/dev/null", "bs=4k", "count=1", "iflag=direct"],
            check=False, timeout=60)
    assert p.returncode != 0


def test_powercut_partial_keeps_a_subset_of_whole_writes(devices, scratch):
    vp.test_partial_keeps_a_subset_of_whole_writes(devices, scratch)


def test_powercut_needs_the_log(devices):
    vp.test_powercut_needs_the_log(devices)


def test_recovery_stays_ublk_only(devices):
    dev = devices.add("-t", "mem", "--size", "16M")
    p = cli("recover", str(dev["id"]), check=False)
    assert p.returncode != 0 and "FUSE" in p.stderr


# -- the pattern target, written once, served by FUSE ------------------------------------------
def test_pattern_reads_its_offsets_and_is_read_only(devices):
    dev = devices.add("-t", "pattern", "--size", "64M")
    assert pread_direct(dev["path"], 1 << 20, 5 << 20) == vt.pattern_bytes(5 << 20, 1 << 20)
    assert pread_direct(dev["path"], 4096, (64 << 20) - 4096) == vt.pattern_bytes((64 << 20) - 4096, 4096)
    # the disk refuses a writable open, so losetup made the loop device read-only
    with open(f"/sys/block/{os.path.basename(dev['path'])}/ro") as f:
        assert f.read().strip() == "1"
    with pytest.raises(OSError):
        pwrite_direct(dev["path"], bytes(4096), 0)
    with pytest.raises(OSError) as e:
        os.open(dev["file"], os.O_RDWR)
    assert e.value.errno == errno.EROFS
    recs = [json.loads(l) for l in cli("trace", str(dev["id"]), "--from-start", "--json", "--count", "2",
                                       "--duration", "5s", "op=read").stdout.splitlines()]
    assert recs and all(r["result"] > 0 for r in recs)
