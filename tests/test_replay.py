"""`replay` and the dm-log-writes format on the host: logs built byte by byte as the kernel
lays them out (drivers/md/dm-log-writes.c), replayed onto image files and compared with a
model; hostile logs and targets give one line, never a traceback. The proof against the
kernel's own log-writes target is tests/vm/test_replay.py."""
import json
import os
import shutil
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ublkshell.cli import main
from ublkshell.crash import logwrites as lw
from ublkshell.crash.logwrites import DISCARD, FLUSH, FUA, MARK, Log, LogError
from ublkshell.observe.schema import check


class Builder:
    """A log as dm-log-writes writes one, and the device it describes (the model)."""

    def __init__(self, sectorsize=512, dev_sectors=256):
        self.ss, self.body, self.n = sectorsize, bytearray(), 0
        self.model = bytearray(sectorsize * dev_sectors)

    def _entry(self, sector, nr, flags, mark=None, data=b""):
        self.body += lw.pack_entry(sector, nr, flags, mark, self.ss) + data
        self.n += 1

    def write(self, sector, data, flags=0):
        assert len(data) % self.ss == 0
        self._entry(sector, len(data) // self.ss, flags, data=data)
        self.model[sector * self.ss:sector * self.ss + len(data)] = data

    def discard(self, sector, nr):
        self._entry(sector, nr, DISCARD)
        self.model[sector * self.ss:(sector + nr) * self.ss] = bytes(nr * self.ss)

    def flush(self):
        self._entry(0, 0, FLUSH)

    def mark(self, name):
        self._entry(0, 0, MARK, mark=name)

    def bytes(self, nr_entries=None):
        return lw.pack_super(self.n if nr_entries is None else nr_entries, self.ss) + bytes(self.body)

    def save(self, path, **kw):
        with open(path, "wb") as f:
            f.write(self.bytes(**kw))
        return str(path)


def replay(*args):
    """The CLI in this process: (exit status, stdout, stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["replay", *map(str, args)])
    return rc, out.getvalue(), err.getvalue()


def read(path):
    with open(path, "rb") as f:
        return f.read()


def sample(tmp_path, ss=512):
    b = Builder(ss)
    b.write(0, b"a" * ss * 2)
    b.write(8, b"b" * ss, FUA)
    snap1 = bytes(b.model)
    b.mark("one")
    b.discard(0, 1)
    b.write(20, b"c" * ss * 3)
    b.flush()
    snap2 = bytes(b.model)
    b.mark("two")
    return b, b.save(tmp_path / "run.log"), snap1, snap2


def test_list_shows_entries_flags_and_marks(tmp_path):
    b, log, _, _ = sample(tmp_path)
    rc, out, err = replay(log, "--list", "--json")
    assert rc == 0 and err == ""
    got = [check("replay_entry", json.loads(line)) for line in out.splitlines()]
    assert [(e["entry"], e["flags"], e["sector"], e["sectors"], e["mark"]) for e in got] == [
        (0, ["write"], 0, 2, None), (1, ["fua"], 8, 1, None), (2, ["mark"], 0, 0, "one"),
        (3, ["discard"], 0, 1, None), (4, ["write"], 20, 3, None), (5, ["flush"], 0, 0, None),
        (6, ["mark"], 0, 0, "two")]
    rc, out, _ = replay(log, "--list", "--to-mark", "one")
    assert rc == 0 and out.splitlines()[-1].split() == ["2", "mark", "mark", "one"]
    assert len(out.splitlines()) == 3


@pytest.mark.parametrize("ss", [512, 4096])
def test_replay_to_each_mark_and_entry_matches_the_model(tmp_path, ss):
    b, log, snap1, snap2 = sample(tmp_path, ss)
    img = tmp_path / "img"
    rc, out, err = replay(log, img, "--size", len(b.model), "--to-mark", "one", "--json")
    assert rc == 0, err
    assert read(img) == snap1 and check("replay", json.loads(out))["last_entry"] == 2
    os.unlink(img)
    rc, out, _ = replay(log, img, "--size", len(b.model), "--to-entry", 5)
    assert rc == 0 and read(img) == snap2
    assert "replayed 6 entries" in out and "1 discards" in out and "1 flushes" in out
    # onto an image that exists: applied on top of what it holds
    rc, _, _ = replay(log, img)
    assert rc == 0 and read(img) == bytes(b.model)


def test_entries_past_the_super_blocks_count_are_not_replayed(tmp_path):
    # the kernel rewrites the super block only after FUA writes and marks
    b = Builder()
    b.write(0, b"x" * 512, FUA)
    b.write(1, b"y" * 512)
    log = b.save(tmp_path / "run.log", nr_entries=1)
    img = tmp_path / "img"
    assert replay(log, img, "--size", "128k")[0] == 0
    assert read(img)[:1024] == b"x" * 512 + bytes(512)


def test_checks_run_at_flush_points_and_the_first_failure_stops(tmp_path):
    b, log, _, _ = sample(tmp_path)
    img = tmp_path / "img"
    seen = tmp_path / "seen"
    script = tmp_path / "check.sh"
    # fails once the image holds the "c" sectors (entry 4, checked at the flush, entry 5)
    script.write_text(f'#!/bin/sh\necho "$UBLKSHELL_REPLAY_ENTRY" >> {seen}\n'
                      f'! grep -q ccc "$1"\n')
    script.chmod(0o700)
    rc, out, err = replay(log, img, "--size", "128k", "--check", f"{script} {{}}")
    assert rc == 1
    assert read(seen).split() == [b"1", b"5"]  # the FUA write, then the flush
    assert "after entry 5 (flush)" in err and "--to-entry 5" in err and "Traceback" not in err
    os.unlink(img), os.unlink(seen)
    rc, out, _ = replay(log, img, "--size", "128k", "--check", "true", "--check-at", "mark", "--json")
    assert rc == 0 and check("replay", json.loads(out))["checks"] == 2
    os.unlink(img)
    rc, out, _ = replay(log, img, "--size", "128k", "--check", "false", "--json")
    failed = check("replay_failed", json.loads(out))
    assert rc == 1 and failed["failed_entry"] == 1 and failed["check_status"] == 1
    assert failed["rebuild"].endswith(f"--size {128 << 10} --to-entry 1")


def one_line_error(rc_want, *args):
    rc, out, err = replay(*args)
    assert rc == rc_want, (rc, out, err)
    assert err.count("\n") == 1 and err.startswith("ublkshell: ") and "Traceback" not in err, err
    return err


def test_hostile_logs_are_one_line_errors(tmp_path):
    b, good, _, _ = sample(tmp_path)
    raw = read(good)
    cases = {
        "empty": b"",
        "magic": b"\0" * 4096,
        "version": struct.pack("<QQQI", lw.MAGIC, 2, 0, 512).ljust(512, b"\0"),
        "sectorsize": struct.pack("<QQQI", lw.MAGIC, 1, 0, 1000).ljust(1024, b"\0"),
        "count": struct.pack("<QQQI", lw.MAGIC, 1, 1 << 60, 512).ljust(512, b"\0"),
        "truncated data": raw[:512 + 512 + 600],
        "flags": lw.pack_super(1, 512) + lw.ENTRY.pack(0, 0, 1 << 9, 0).ljust(512, b"\0"),
        "huge sector": lw.pack_super(1, 512) + lw.ENTRY.pack(1 << 62, 1 << 61, DISCARD, 0).ljust(512, b"\0"),
        "long mark": lw.pack_super(1, 512) + lw.ENTRY.pack(0, 0, MARK, 4000).ljust(512, b"\0"),
    }
    for what, data in cases.items():
        path = tmp_path / f"bad-{what.replace(' ', '-')}"
        path.write_bytes(data)
        err = one_line_error(1, path, "--list")
        assert str(path) in err, (what, err)
    one_line_error(1, tmp_path / "missing.log", "--list")
    one_line_error(1, tmp_path, "--list")  # a directory


def test_hostile_targets_and_options(tmp_path):
    b, log, _, _ = sample(tmp_path)
    img = tmp_path / "img"
    img.write_bytes(b"")
    assert "exists" in one_line_error(1, log, img, "--size", "1M")
    os.symlink(img, tmp_path / "link")
    assert "symlink" in one_line_error(1, log, tmp_path / "link")
    os.symlink(tmp_path / "nothing", tmp_path / "dangling")
    one_line_error(1, log, tmp_path / "dangling")
    assert "the log itself" in one_line_error(2, log, log)
    assert "has 7 entries" in one_line_error(2, log, img, "--to-entry", 7)
    err = one_line_error(2, log, img, "--to-mark", "nope")
    assert "'one', 'two'" in err
    one_line_error(2, log, img, "--to-entry", -1)
    one_line_error(2, log, img, "--to-entry", 1, "--to-mark", "one")
    one_line_error(2, log, img, "--check-at", "sometimes", "--check", "true")
    one_line_error(2, log, img, "--check", "'unterminated")
    one_line_error(2, log, img, "--size", "-5")
    one_line_error(2, log, "--list", img)
    one_line_error(2, log)
    assert "nonexistent-check" in one_line_error(1, log, img, "--check", "/nonexistent-check")
    # a mark that is not UTF-8 is shown, not fatal
    b2 = Builder()
    b2.body += lw.ENTRY.pack(0, 0, MARK, 3) + b"\xff\xfeA"
    b2.body += bytes(512 - lw.ENTRY.size - 3)
    b2.n += 1
    rc, out, _ = replay(b2.save(tmp_path / "odd.log"), "--list")
    assert rc == 0 and "\\xff\\xfeA" in out
    # nor does a terminal get a mark's escape sequence
    b3 = Builder()
    b3.mark("\x1b]0;owned\x07\x1b[2J")
    rc, out, _ = replay(b3.save(tmp_path / "esc.log"), "--list")
    assert rc == 0 and "\x1b" not in out and "\x07" not in out and "\\x1b]0;owned\\x07" in out


ops = st.one_of(
    st.tuples(st.just("w"), st.integers(0, 60), st.integers(1, 4), st.booleans()),
    st.tuples(st.just("d"), st.integers(0, 60), st.integers(1, 4)),
    st.tuples(st.just("f")), st.tuples(st.just("m")))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(ops, max_size=30), st.sampled_from([512, 4096]))
def test_replay_equals_the_model_at_every_mark(tmp_path, seq, ss):
    b, snaps = Builder(ss, 64), []
    for i, op in enumerate(seq):
        if op[0] == "w":
            b.write(op[1], bytes([i + 1]) * (op[2] * ss), FUA if op[3] else 0)
        elif op[0] == "d":
            b.discard(op[1], op[2])
        elif op[0] == "f":
            b.flush()
        else:
            snaps.append(bytes(b.model))
            b.mark(f"m{len(snaps)}")
    log = b.save(tmp_path / "h.log")
    for n, snap in enumerate(snaps, 1):
        img = tmp_path / f"h{n}.img"
        rc, _, err = replay(log, img, "--size", len(b.model), "--to-mark", f"m{n}")
        assert rc == 0, err
        assert read(img) == snap
        os.unlink(img)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=3000), st.integers(0, 40))
def test_any_bytes_after_a_valid_super_block_never_crash(tmp_path, body, nr):
    path = tmp_path / "f.log"
    path.write_bytes(lw.pack_super(nr, 512) + body)
    try:
        with Log(str(path)) as log:
            for e in log:
                if e.data_at >= 0:
                    log.read_data(e, 0, e.nr_sectors * 512)
    except LogError as e:
        assert str(path) in str(e)


needs_loop = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/loop-control") or not shutil.which("losetup"),
    reason="a block device target needs root and the loop driver")


@pytest.fixture
def loop_device(tmp_path):
    backing = tmp_path / "backing"
    with open(backing, "wb") as f:
        f.write(b"\xee" * (128 << 10))
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True, capture_output=True,
                         text=True).stdout.strip()
    yield dev
    subprocess.run(["losetup", "-d", dev], check=False)


@needs_loop
def test_replay_onto_a_block_device_zeroes_discards(tmp_path, loop_device):
    b, log, _, _ = sample(tmp_path)
    # the sample's writes and its discard of sector 0, over the device's old bytes
    want = bytearray(b"\xee" * (128 << 10))
    want[0:1024], want[8 * 512:9 * 512], want[20 * 512:23 * 512] = b"a" * 1024, b"b" * 512, b"c" * 1536
    want[0:512] = bytes(512)
    rc, out, err = replay(log, loop_device)
    assert rc == 0, err
    assert read(loop_device) == bytes(want)
    # a symlink to a device is followed (as /dev/disk/by-id/... is)
    os.symlink(loop_device, tmp_path / "by-id")
    assert replay(log, tmp_path / "by-id", "--to-mark", "one")[0] == 0


@needs_loop
def test_a_device_too_small_is_refused_before_any_write(tmp_path, loop_device):
    b = Builder()
    b.write(0, b"z" * 512)
    b.write(1 << 20, b"z" * 512)  # past the 128 KiB device
    err = one_line_error(1, b.save(tmp_path / "big.log"), loop_device)
    assert "past the end" in err and "entry 1" in err
    assert read(loop_device)[:512] == b"\xee" * 512


@needs_loop
def test_a_mounted_device_is_refused(tmp_path, loop_device):
    subprocess.run(["mkfs.ext4", "-q", "-F", loop_device], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", loop_device, str(mnt)], check=True)
    try:
        b, log, _, _ = sample(tmp_path)
        assert "mounted or in use" in one_line_error(1, log, loop_device)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_fifos_are_refused_not_waited_on(tmp_path):
    b, log, _, _ = sample(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "a file or a block device" in one_line_error(1, fifo, "--list")
    assert "neither a block device nor a file" in one_line_error(1, log, fifo)
    assert "neither a block device nor a file" in one_line_error(1, log, "/dev/null")
