"""dm-log-writes logs against the real thing.

- The kernel's log-writes target logs an ext4 workload (mkfs with its discards, files,
  deletes, fstrim) over loop devices; at each mark the data device's bytes are kept;
  `ublkshell replay` of the kernel's log must rebuild each of them byte for byte, and fsck
  must pass at each mark.
- A ublkshell device with `--log-writes` runs the same ext4 workload: its own log must do
  the same.
- Both run one raw workload (direct writes, flushes, a discard, a zeroout, writes left
  without a flush), issued one at a time: the two logs must hold the same entries, in the
  same order, with the same data.

The workloads are plain functions: tests/test_logdevice.py runs them on FUSE devices."""
import fcntl
import hashlib
import json
import os
import struct

import pytest

from .conftest import cli, pattern, pwrite_direct, run

SIZE = 32 << 20
EXT4_MARKS = ("mkfs", "files", "trimmed")
RAW_MARKS = ("written", "discarded")
BLKDISCARD, BLKZEROOUT = 0x1277, 0x127F
KERNEL_END, OUR_END = "dm-log-writes-end", "ublkshell-end"


def digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fsync_device(path: str) -> None:
    # a FLUSH through the device: a log holds the writes completed before it, then the flush
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _range_ioctl(path: str, op: int, offset: int, length: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        fcntl.ioctl(fd, op, struct.pack("QQ", offset, length))
    finally:
        os.close(fd)


def _points(dev, mark, digest_of):
    kept = {}

    def point(label):
        fsync_device(dev)
        mark(label)
        kept[label] = digest_of()
    return kept, point


def ext4_workload(dev: str, mnt: str, mark, digest_of) -> dict:
    """mkfs, files, deletes and fstrim, with a flush and a mark after each step; returns each
    mark's device digest."""
    kept, point = _points(dev, mark, digest_of)
    os.makedirs(mnt, exist_ok=True)
    run(["mkfs.ext4", "-q", "-F", "-E", "discard", dev])
    point("mkfs")
    run(["mount", "-o", "discard", dev, mnt])
    try:
        for i in range(20):
            with open(os.path.join(mnt, f"f{i}"), "wb") as f:
                f.write(os.urandom(4096 * (i + 1)))
        os.sync()
    finally:
        run(["umount", mnt])
    point("files")
    run(["mount", dev, mnt])
    try:
        for i in range(0, 20, 2):
            os.unlink(os.path.join(mnt, f"f{i}"))
        os.sync()
        run(["fstrim", mnt])
    finally:
        run(["umount", mnt])
    point("trimmed")
    return kept


def raw_workload(dev: str, mark, digest_of) -> dict:
    """Direct writes, one at a time (nothing to merge or reorder), flushes, a discard, a zeroout,
    and last two writes no flush follows; returns each mark's device digest."""
    kept, point = _points(dev, mark, digest_of)
    pwrite_direct(dev, pattern(64 << 10, 1), 0)
    pwrite_direct(dev, pattern(16 << 10, 2), 1 << 20)
    pwrite_direct(dev, pattern(4 << 10, 3), 4 << 20)
    point("written")
    _range_ioctl(dev, BLKDISCARD, 0, 64 << 10)
    _range_ioctl(dev, BLKZEROOUT, 1 << 20, 8 << 10)
    pwrite_direct(dev, pattern(8 << 10, 4), 2 << 20)
    point("discarded")
    pwrite_direct(dev, pattern(4 << 10, 5), 3 << 20)
    pwrite_direct(dev, pattern(12 << 10, 6), 5 << 20)
    return kept


def listed(log: str) -> list[dict]:
    return [json.loads(line) for line in cli("replay", log, "--list", "--json").stdout.splitlines()]


def check_replays(log: str, scratch: str, kept: dict, final: str, end_mark: str, fsck: bool = False):
    """Replay to each mark (and the whole log) and compare with the device's digests."""
    entries = listed(log)
    assert [e["mark"] for e in entries if "mark" in e["flags"]] == [*kept, end_mark]
    assert any("flush" in e["flags"] for e in entries)
    assert [e["entry"] for e in entries] == list(range(len(entries)))
    img = os.path.join(scratch, "replayed.img")
    for i, label in enumerate(kept):
        got = json.loads(cli("replay", log, img, "--size", str(SIZE), "--to-mark", label, "--json").stdout)
        assert got["marks"] == i + 1, got
        assert digest(img) == kept[label], f"replay to mark {label} differs from the device at that mark"
        os.unlink(img)
    cli("replay", log, img, "--size", str(SIZE))
    assert digest(img) == final, "replaying the whole log differs from the device at its end"
    os.unlink(img)
    if fsck:
        # the log at each mark holds a clean ext4
        got = json.loads(cli("replay", log, img, "--size", str(SIZE), "--check", "fsck.ext4 -fn {}",
                             "--check-at", "mark", "--json").stdout)
        assert got["checks"] == len(kept) + 1, got
        os.unlink(img)


def entries_with_data(log_path: str) -> list[tuple]:
    """(flags, sector, sectors, mark, sha256 of the data) of every entry but the end mark."""
    from ublkshell.crash.logwrites import Log

    out = []
    with Log(log_path) as log:
        for e in log:
            data = None
            if e.data_at >= 0:
                data = hashlib.sha256(log.read_data(e, 0, e.nr_sectors * log.super.sectorsize)).hexdigest()
            out.append((e.flags, e.sector, e.nr_sectors, e.mark, data))
    assert out and out[-1][3] in (KERNEL_END, OUR_END)
    return out[:-1]


@pytest.fixture
def log_writes(scratch):
    """The kernel's log-writes target over two loop devices on tmpfs: a function that makes
    one (dm device, data file, log file, mark function, remove function)."""
    run(["modprobe", "dm-log-writes"])
    made = []
    # no udev in the VM: dmsetup makes the node itself
    env = dict(os.environ, DM_DISABLE_UDEV="1")

    def make(tag: str):
        data, log = os.path.join(scratch, f"{tag}-data.img"), os.path.join(scratch, f"{tag}-log.img")
        for path, size in ((data, SIZE), (log, 8 * SIZE)):
            with open(path, "wb") as f:
                f.truncate(size)
        loops = [run(["losetup", "--find", "--show", p]).stdout.strip() for p in (data, log)]
        name = f"ublkshell-lw-{os.getpid()}-{tag}"
        made.append((name, loops))
        run(["dmsetup", "create", name, "--table", f"0 {SIZE // 512} log-writes {loops[0]} {loops[1]}"],
            env=env)

        def mark(label):
            run(["dmsetup", "message", name, "0", "mark", label], env=env)

        def remove():
            # logs the held writes, its end mark and the super block
            run(["dmsetup", "remove", name], env=env)
        return f"/dev/mapper/{name}", data, log, mark, remove

    yield make
    run(["umount", os.path.join(scratch, "mnt")], check=False)
    for name, loops in made:
        run(["dmsetup", "remove", name], check=False, env=env)
        for dev in loops:
            run(["losetup", "-d", dev], check=False)


def test_replay_rebuilds_the_kernel_log_at_every_mark(log_writes, scratch):
    dev, data, log, mark, remove = log_writes("ext4")
    kept = ext4_workload(dev, os.path.join(scratch, "mnt"), mark, lambda: digest(data))
    remove()
    assert any("discard" in e["flags"] for e in listed(log)), "the workload's discards were not logged"
    check_replays(log, scratch, kept, digest(data), KERNEL_END, fsck=True)


def test_a_ublk_device_logs_ext4_as_the_kernel_target_does(devices, scratch):
    log = os.path.join(scratch, "ublk.log")
    dev = devices.add("-t", "mem", "--size", str(SIZE), "--log-writes", log)
    kept = ext4_workload(dev["path"], os.path.join(scratch, "mnt"),
                         lambda label: cli("mark", str(dev["id"]), label), lambda: digest(dev["path"]))
    final = digest(dev["path"])
    info = cli("info", str(dev["id"])).stdout
    assert f"write log: {log}:" in info and "STOPPED" not in info, info
    cli("del", str(dev["id"]))
    entries = listed(log)
    assert any("discard" in e["flags"] for e in entries), "the workload's discards were not logged"
    assert any("meta" in e["flags"] for e in entries), "ext4's metadata writes carry no REQ_META flag"
    check_replays(log, scratch, kept, final, OUR_END, fsck=True)


def test_ublk_and_kernel_logs_of_one_workload_hold_the_same_entries(log_writes, devices, scratch):
    kdev, data, klog, kmark, remove = log_writes("raw")
    kept_kernel = raw_workload(kdev, kmark, lambda: digest(data))
    remove()

    log = os.path.join(scratch, "raw-ublk.log")
    dev = devices.add("-t", "mem", "--size", str(SIZE), "--log-writes", log)
    kept = raw_workload(dev["path"], lambda label: cli("mark", str(dev["id"]), label),
                        lambda: digest(dev["path"]))
    final = digest(dev["path"])
    cli("del", str(dev["id"]))

    assert kept == kept_kernel, "the two devices held different bytes at the marks"
    ours, theirs = entries_with_data(log), entries_with_data(klog)
    assert ours == theirs, "\n".join(f"{a}  |  {b}" for a, b in zip(ours, theirs))
    check_replays(log, scratch, kept, final, OUR_END)


def test_an_upgraded_daemon_goes_on_with_the_log_and_a_dead_one_ends_it(devices, scratch):
    """An orderly hand-over (upgrade) logs everything the old daemon completed, and the new
    daemon goes on with the same log: replay still rebuilds the device. A daemon that dies
    takes the writes it held with it, so its successor ends the log with a restart mark
    rather than go on with a log that no longer matches the device."""
    log = os.path.join(scratch, "handover.log")
    # upgrade quiesces the device: per tag, as batch IO fails what it queues meanwhile
    dev = devices.add("-t", "mem", "--size", str(SIZE), "--recovery", "--io-mode", "per-tag",
                      "--log-writes", log)
    path, name = dev["path"], str(dev["id"])
    pwrite_direct(path, pattern(64 << 10, 1), 0)
    fsync_device(path)
    cli("mark", name, "before")
    pwrite_direct(path, pattern(16 << 10, 2), 1 << 20)     # held: no flush follows
    cli("upgrade", name)
    pwrite_direct(path, pattern(8 << 10, 3), 2 << 20)
    fsync_device(path)
    cli("mark", name, "after")
    after = digest(path)

    pwrite_direct(path, pattern(4 << 10, 4), 3 << 20)      # held when the daemon dies
    cli("kill", name)
    cli("recover", name)
    r = cli("mark", name, "late", check=False)
    assert r.returncode != 0 and "died" in r.stderr, r.stderr
    assert "STOPPED" in cli("info", name).stdout
    cli("del", name)

    marks = [e["mark"] for e in listed(log) if "mark" in e["flags"]]
    assert marks == ["before", "ublkshell-handover", "after", "ublkshell-daemon-restart"]
    img = os.path.join(scratch, "r.img")
    cli("replay", log, img, "--size", str(SIZE), "--to-mark", "after")
    assert digest(img) == after, "the upgraded daemon's log does not rebuild the device"
