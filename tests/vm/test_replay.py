"""`replay` against the real thing: the kernel's dm-log-writes target logs an ext4 workload
(mkfs with its discards, files, deletes, fstrim) on a loop device; at each mark the data
device's bytes are kept; `ublkshell replay` of the kernel's log must rebuild each of them
byte for byte, and fsck must pass at each mark."""
import hashlib
import json
import os

import pytest

from .conftest import cli, run

SIZE = 64 << 20
MARKS = ("mkfs", "files", "trimmed")


def digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fsync_device(path: str) -> None:
    # a FLUSH through the target: dm-log-writes logs the writes completed before it, then the flush
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.fixture
def log_writes(scratch):
    """(dm device, data file, log file): a log-writes target over two loop devices on tmpfs."""
    run(["modprobe", "dm-log-writes"])
    data, log = os.path.join(scratch, "data.img"), os.path.join(scratch, "log.img")
    for path, size in ((data, SIZE), (log, 8 * SIZE)):
        with open(path, "wb") as f:
            f.truncate(size)
    loops = [run(["losetup", "--find", "--show", p]).stdout.strip() for p in (data, log)]
    name = f"ublkshell-lw-{os.getpid()}"
    # no udev in the VM: dmsetup makes the node itself
    env = dict(os.environ, DM_DISABLE_UDEV="1")
    try:
        run(["dmsetup", "create", name, "--table", f"0 {SIZE // 512} log-writes {loops[0]} {loops[1]}"], env=env)
        yield f"/dev/mapper/{name}", data, log, env, name
    finally:
        run(["umount", os.path.join(scratch, "mnt")], check=False)
        run(["dmsetup", "remove", name], check=False, env=env)
        for dev in loops:
            run(["losetup", "-d", dev], check=False)


def test_replay_rebuilds_the_kernel_log_at_every_mark(log_writes, scratch):
    dev, data, log, env, name = log_writes
    mnt = os.path.join(scratch, "mnt")
    os.makedirs(mnt)
    kept = {}

    def mark(label):
        fsync_device(dev)
        run(["dmsetup", "message", name, "0", "mark", label], env=env)
        kept[label] = digest(data)

    run(["mkfs.ext4", "-q", "-F", "-E", "discard", dev])
    mark("mkfs")
    run(["mount", "-o", "discard", dev, mnt])
    for i in range(20):
        with open(os.path.join(mnt, f"f{i}"), "wb") as f:
            f.write(os.urandom(4096 * (i + 1)))
    os.sync()
    run(["umount", mnt])
    mark("files")
    run(["mount", dev, mnt])
    for i in range(0, 20, 2):
        os.unlink(os.path.join(mnt, f"f{i}"))
    os.sync()
    run(["fstrim", mnt])
    run(["umount", mnt])
    mark("trimmed")
    run(["dmsetup", "remove", name], env=env)  # logs its end mark and the super block
    final = digest(data)

    listed = [json.loads(line) for line in cli("replay", log, "--list", "--json").stdout.splitlines()]
    assert [e["mark"] for e in listed if "mark" in e["flags"]] == [*MARKS, "dm-log-writes-end"]
    assert any("discard" in e["flags"] for e in listed), "the workload's discards were not logged"
    assert any("flush" in e["flags"] for e in listed)
    assert [e["entry"] for e in listed] == list(range(len(listed)))

    for label in MARKS:
        img = os.path.join(scratch, f"at-{label}.img")
        got = json.loads(cli("replay", log, img, "--size", str(SIZE), "--to-mark", label, "--json").stdout)
        assert got["marks"] == MARKS.index(label) + 1, got
        assert digest(img) == kept[label], f"replay to mark {label} differs from the device at that mark"
        os.unlink(img)
    img = os.path.join(scratch, "all.img")
    cli("replay", log, img, "--size", str(SIZE))
    assert digest(img) == final

    # the kernel's log at each mark holds a clean ext4
    os.unlink(img)
    got = json.loads(cli("replay", log, img, "--size", str(SIZE), "--check", "fsck.ext4 -fn {}",
                         "--check-at", "mark", "--json").stdout)
    assert got["checks"] == len(MARKS) + 1, got
