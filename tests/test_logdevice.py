"""add --log-writes on the host.

The native log (native/logwrites.c) is driven first through the same begin/end calls the
pipeline makes, against a model of dm-log-writes' ordering rules, and read back with the
reader that reads the kernel's own logs (crash/logwrites.py). Then a real FUSE device on a
real loop device: raw writes, flushes, discards and zeroouts, and an ext4 workload, are
rebuilt by `replay` byte for byte at every mark (the same workloads the VM runs through the
kernel's dm-log-writes and through a ublk device: tests/vm/test_replay.py)."""
import errno
import json
import os
import shutil
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ublkshell._native import ffi, lib
from ublkshell.crash import logwrites
from ublkshell.crash.logwrites import DISCARD, FLUSH, FUA, MARK, Log
from ublkshell.observe import schema

from vm import test_replay as vr
from vm.conftest import cli, pattern, pread_direct, pwrite_direct

S = 512
WRITE, OPFLUSH = lib.UBLK_IO_OP_WRITE, lib.UBLK_IO_OP_FLUSH
OPDISCARD, ZEROES = lib.UBLK_IO_OP_DISCARD, lib.UBLK_IO_OP_WRITE_ZEROES
F_FUA, F_META = lib.UBLK_IO_F_FUA, lib.UBLK_IO_F_META


class NativeLog:
    """A log file and the native writer, driven as the pipeline drives it."""

    def __init__(self, path, sectorsize=512, limit=64 << 20):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        err = ffi.new("int *")
        self.lw = lib.us_lw_open(self.fd, sectorsize, 0, 0, limit, err)
        assert self.lw != ffi.NULL, os.strerror(-err[0])

    def begin(self, op, sector=0, sectors=0, fill=None):
        # the write's data is in the tag's buffer before the target runs
        io = lib.us_lw_test_begin(self.lw, op, sector, sectors,
                                  ffi.NULL if fill is None else fill * (sectors * S))
        assert io != ffi.NULL
        return io

    def end(self, io, result=0):
        lib.us_lw_test_end(self.lw, io, result)

    def mark(self, name: bytes):
        index = ffi.new("uint64_t *")
        rc = lib.us_lw_mark(self.lw, name, 5000, index)
        return rc if rc < 0 else int(index[0])

    def status(self):
        s = ffi.new("struct us_lw_status *")
        lib.us_lw_status(self.lw, s)
        return s

    def close(self, end_mark=ffi.NULL):
        rc = lib.us_lw_close(self.lw, end_mark, 5000)
        os.close(self.fd)
        return rc

    def entries(self):
        with Log(self.path) as log:
            out = []
            for e in log:
                data = log.read_data(e, 0, e.nr_sectors * log.super.sectorsize) if e.data_at >= 0 else None
                out.append((e.flags, e.sector, e.nr_sectors, e.mark, data))
            return out


# one event of a random history: ("write", slot, sector, sectors, fua), ("end", slot, ok),
# ("flush", slot), ("mark",)
def histories():
    slot = st.integers(0, 5)
    return st.lists(st.one_of(
        st.tuples(st.just("write"), slot, st.integers(0, 60), st.integers(1, 4), st.booleans()),
        st.tuples(st.just("discard"), slot, st.integers(0, 60), st.integers(1, 4)),
        st.tuples(st.just("zeroes"), slot, st.integers(0, 60), st.integers(1, 4)),
        st.tuples(st.just("flush"), slot),
        st.tuples(st.just("end"), slot, st.booleans()),
        st.tuples(st.just("mark"),)), max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=histories())
def test_the_log_orders_writes_as_dm_log_writes_does(tmp_path_factory, history):
    """Completed writes wait for a FLUSH sent after they completed; FUA writes and marks go
    in at once; a failed FLUSH leaves its writes for the next; failed writes never appear."""
    path = os.path.join(str(tmp_path_factory.mktemp("lw")), "log")
    lw = NativeLog(path)
    inflight, held, out = {}, [], []
    n = 0
    for ev in history:
        kind = ev[0]
        if kind in ("write", "discard", "zeroes", "flush"):
            if ev[1] in inflight:
                continue
            n += 1
            if kind == "flush":
                io = lw.begin(OPFLUSH)
                entry = (FLUSH, 0, 0, None, None)
                inflight[ev[1]] = (io, entry, held)
                held = []
                continue
            sector, sectors = ev[2], ev[3]
            if kind == "write":
                fill = bytes([n % 251 + 1])
                io = lw.begin(WRITE | (F_FUA if ev[4] else 0), sector, sectors, fill)
                entry = (FUA if ev[4] else 0, sector, sectors, None, fill * sectors * S)
            elif kind == "discard":
                io = lw.begin(OPDISCARD, sector, sectors)
                entry = (DISCARD, sector, sectors, None, None)
            else:
                io = lw.begin(ZEROES, sector, sectors)
                entry = (0, sector, sectors, None, bytes(sectors * S))
            inflight[ev[1]] = (io, entry, None)
        elif kind == "end":
            if ev[1] not in inflight:
                continue
            io, entry, captured = inflight.pop(ev[1])
            ok = ev[2]
            lw.end(io, 0 if ok else -errno.EIO)
            if captured is not None:        # a FLUSH
                if ok:
                    out += captured + [entry]
                else:
                    held = captured + held
            elif ok:
                (out if entry[0] & FUA else held).append(entry)
        else:
            name = f"m{len(out)}".encode()
            assert lw.mark(name) == len(out)
            out.append((MARK, 0, 0, name.decode(), None))
    for io, _, captured in inflight.values():
        lw.end(io, -errno.EIO)
        if captured is not None:
            held = captured + held
    assert lw.close(b"end") == 0
    out += held + [(MARK, 0, 0, "end", None)]
    assert lw.entries() == out


def test_sectors_are_the_device_block_size_and_metadata_is_flagged(tmp_path):
    lw = NativeLog(str(tmp_path / "log"), sectorsize=4096)
    lw.end(lw.begin(WRITE | F_META, 16, 8, b"m"))      # 512-byte sectors 16..23: block 2
    lw.end(lw.begin(OPDISCARD, 64, 16))
    lw.end(lw.begin(OPFLUSH))
    assert lw.close() == 0
    with Log(lw.path) as log:
        assert log.super.sectorsize == 4096
        got = [(e.flags, e.sector, e.nr_sectors) for e in log]
    assert got == [(logwrites.METADATA, 2, 1), (DISCARD, 8, 2), (FLUSH, 0, 0)]


def test_past_the_memory_bound_logging_stops_and_the_log_stays_valid(tmp_path):
    lw = NativeLog(str(tmp_path / "log"), limit=64 << 10)
    lw.end(lw.begin(WRITE, 0, 64, b"a"))              # 32K held
    lw.end(lw.begin(OPFLUSH))
    assert lw.mark(b"kept") == 2
    assert lib.us_lw_sync(lw.lw, 5000) == 0            # the writer has let go of what it wrote
    for i in range(4):                                 # 128K without a flush: over 64K
        lw.end(lw.begin(WRITE, 64 * i, 64, b"b"))
    st_ = lw.status()
    assert st_.error == errno.ENOBUFS and st_.held_bytes == 0
    assert lw.mark(b"late") == -errno.ENOBUFS
    lw.end(lw.begin(OPFLUSH))
    assert lw.close(b"end") == -errno.ENOBUFS
    assert [(e[0], e[3]) for e in lw.entries()] == [(0, None), (FLUSH, None), (MARK, "kept")]


def test_mark_names_are_bounded_by_the_sector(tmp_path):
    lw = NativeLog(str(tmp_path / "log"))
    assert lw.mark(b"x" * 480) == -errno.EINVAL
    assert lw.mark(b"") == -errno.EINVAL
    assert lw.mark(b"x" * 479) == 0
    assert lw.close() == 0
    assert lw.entries()[0][3] == "x" * 479


# -- a real FUSE device on a real loop device ---------------------------------------------------
needs_fuse_loop = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control")
    or not shutil.which("losetup") or not shutil.which("mkfs.ext4"),
    reason="FUSE devices with loop devices need root, /dev/fuse, the loop driver, losetup, mkfs.ext4")


@pytest.fixture
def fuse_env(tmp_path_factory, monkeypatch):
    root = str(tmp_path_factory.mktemp("lwd"))
    os.makedirs(os.path.join(root, "mem"), mode=0o700)
    monkeypatch.setenv("UBLKSHELL_STATE_DIR", os.path.join(root, "state"))
    monkeypatch.setenv("UBLKSHELL_DATA_DIR", os.path.join(root, "mem"))
    added = []

    def add(*args):
        dev = json.loads(cli("add", "-t", "mem", "--transport", "fuse", "--loop", *args, "--json").stdout)
        added.append(dev)
        return dev

    yield root, add
    for dev in added:
        cli("del", str(dev["id"]), check=False, timeout=60)


def logged_run(fuse_env, workload, fsck):
    root, add = fuse_env
    log = os.path.join(root, "run.log")
    dev = add("--size", str(vr.SIZE), "--log-writes", log)
    kept = workload(dev, lambda label: cli("mark", dev["name"], label), lambda: vr.digest(dev["loop"]))
    final = vr.digest(dev["loop"])
    info = cli("info", dev["name"]).stdout
    assert f"write log: {log}:" in info and "STOPPED" not in info, info
    cli("del", dev["name"])
    vr.check_replays(log, root, kept, final, vr.OUR_END, fsck=fsck)


@needs_fuse_loop
def test_a_fuse_device_log_replays_raw_io_byte_for_byte_at_every_mark(fuse_env):
    logged_run(fuse_env, lambda dev, mark, digest: vr.raw_workload(dev["loop"], mark, digest), fsck=False)


@needs_fuse_loop
def test_a_fuse_device_log_replays_ext4_at_every_mark(fuse_env, tmp_path):
    logged_run(fuse_env, lambda dev, mark, digest: vr.ext4_workload(dev["loop"], str(tmp_path / "mnt"),
                                                                    mark, digest), fsck=True)


@needs_fuse_loop
def test_hostile_log_paths_and_marks_are_one_line_errors(fuse_env, tmp_path):
    root, add = fuse_env
    os.symlink("/etc/passwd-not-here", tmp_path / "dangling")
    (tmp_path / "old.log").write_bytes(b"mine")
    for path, why in ((tmp_path / "dangling", "exists"), (tmp_path / "old.log", "exists"),
                      (tmp_path / "nodir" / "x.log", "is not a directory"),
                      (tmp_path / "old.log" / "x.log", "is not a directory")):
        r = cli("add", "-t", "mem", "--size", "16M", "--transport", "fuse", "--log-writes", str(path),
                check=False)
        assert r.returncode != 0 and why in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "old.log").read_bytes() == b"mine"
    assert os.readlink(tmp_path / "dangling") == "/etc/passwd-not-here"

    dev = add("--size", "16M")
    r = cli("mark", dev["name"], "x", check=False)
    assert r.returncode != 0 and "keeps no write log" in r.stderr
    log = str(tmp_path / "new.log")
    dev = add("--size", "16M", "--log-writes", log)
    for name, why in (("", "empty"), ("y" * 480, "at most 479")):
        r = cli("mark", dev["name"], name, check=False)
        assert r.returncode != 0 and why in r.stderr and "Traceback" not in r.stderr, r.stderr
    odd = "\x1b[2J\udcff mark"
    got = json.loads(cli("mark", dev["name"], odd, "--json").stdout)
    schema.check("mark", got)
    schema.check("info", json.loads(cli("info", dev["name"], "--json").stdout))
    at = got["entry"]
    entries = vr.listed(log)
    assert "mark" in entries[at]["flags"] and entries[at]["entry"] == at
    listed = cli("replay", log, "--list").stdout
    assert "\x1b" not in listed and "\\x1b[2J" in listed
    assert os.stat(log).st_mode & 0o777 == 0o600


@needs_fuse_loop
def test_past_its_memory_bound_a_device_stops_logging_and_says_so(fuse_env):
    root, add = fuse_env
    log = os.path.join(root, "small.log")
    dev = add("--size", "16M", "--log-writes", log, "--log-writes-memory", "1M")
    cli("mark", dev["name"], "before")
    data = pattern(2 << 20, 7)
    for i in range(32):      # 2M, no flush
        pwrite_direct(dev["loop"], data[i << 16:(i + 1) << 16], i << 16)
    deadline = time.monotonic() + 10
    # the daemon publishes the log's status from its wait loop, every 50 ms
    while "STOPPED" not in (info := cli("info", dev["name"]).stdout) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "STOPPED" in info and "--log-writes-memory" in info, info
    r = cli("mark", dev["name"], "after", check=False)
    assert r.returncode != 0 and "stopped" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # the IO went on: the device still serves what was written
    assert pread_direct(dev["loop"], 2 << 20, 0) == data
    cli("del", dev["name"])
    assert [e["mark"] for e in vr.listed(log) if "mark" in e["flags"]] == ["before"]


@needs_fuse_loop
def test_faults_and_odd_io_never_break_the_log(fuse_env):
    """A torn write is logged as what reached the store; an IO smaller than the device's block
    size stops the log (it counts in blocks) with a reason, and the device goes on."""
    root, add = fuse_env
    log = os.path.join(root, "torn.log")
    dev = add("--size", "16M", "--log-writes", log)
    cli("torn", dev["name"], "sectors=1", "count=1")
    data = pattern(64 << 10, 3)
    pwrite_direct(dev["loop"], data, 0)
    vr.fsync_device(dev["loop"])
    cli("mark", dev["name"], "torn")
    kept = vr.digest(dev["loop"])
    cli("del", dev["name"])
    torn = [e for e in vr.listed(log) if e["flags"] == ["write"]]
    assert torn and torn[0]["sectors"] == 1, torn
    img = os.path.join(root, "t.img")
    cli("replay", log, img, "--size", "16M", "--to-mark", "torn")
    assert vr.digest(img) == kept, "the replayed torn write differs from what the store holds"

    log = os.path.join(root, "odd.log")
    disk_dev = add("--size", "16M", "--block-size", "4k", "--log-writes", log)
    fd = os.open(disk_dev["file"], os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * 512, 512)
        os.fsync(fd)
    finally:
        os.close(fd)
    deadline = time.monotonic() + 10
    while "STOPPED" not in (info := cli("info", disk_dev["name"]).stdout) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "STOPPED" in info and "block size" in info, info
    cli("del", disk_dev["name"])
    assert vr.listed(log) is not None   # still a valid log
