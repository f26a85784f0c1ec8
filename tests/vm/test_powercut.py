"""powercut: unflushed writes are forgotten, flushed and FUA ones stay, and a
filesystem comes back from it the way it comes back from a real power loss."""
import json
import mmap
import os
import subprocess
import threading
import time

from .conftest import cli, pattern, pread_direct, pwrite_direct, run

KB = 1024


def _file(scratch, name="disk.img", size=64 << 20):
    path = os.path.join(scratch, name)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _read_file(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def _write(fd, data, off):
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    assert os.pwritev(fd, [buf], off) == len(data)


def powercut(dev, *args):
    return json.loads(cli("powercut", str(dev["id"]), *args, "--json", timeout=120).stdout)


def _gone(dev):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if "†" in cli("list").stdout or not os.path.exists(dev["path"]):
            return True
        time.sleep(0.2)
    return False


def test_unflushed_lost_flushed_kept(devices, scratch):
    img = _file(scratch)
    dev = devices.add("-t", "loop", "-f", img, "--powercut")
    a, b, c, d, e = (pattern(16 * KB, i) for i in range(5))
    fd = os.open(dev["path"], os.O_RDWR | os.O_DIRECT)
    try:
        _write(fd, a, 0)
        os.fsync(fd)                      # FLUSH: a is durable
        _write(fd, b, 0)                  # overwrites a, never flushed
        _write(fd, c, 1 << 20)            # never flushed
    finally:
        os.close(fd)
    # O_DSYNC: a FUA write, and the block layer's flush after it makes b and c durable too
    fd = os.open(dev["path"], os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
    try:
        _write(fd, d, 2 << 20)
    finally:
        os.close(fd)
    fd = os.open(dev["path"], os.O_RDWR | os.O_DIRECT)
    try:
        _write(fd, e, 0)                  # overwrites b, never flushed
        _write(fd, e, 3 << 20)            # never flushed
    finally:
        os.close(fd)
    tr = cli("trace", str(dev["id"]), "--from-start", "--json", "--count", "12", "--duration", "5s",
             "op=write", timeout=60)
    assert any("fua" in json.loads(l)["flags"] for l in tr.stdout.splitlines()), tr.stdout
    r = powercut(dev)
    assert r["dropped"] == 2 and r["dropped_bytes"] == 32 * KB, r
    assert _read_file(img, 0, 16 * KB) == b
    assert _read_file(img, 1 << 20, 16 * KB) == c
    assert _read_file(img, 2 << 20, 16 * KB) == d
    assert _read_file(img, 3 << 20, 16 * KB) == bytes(16 * KB)
    # the daemon died without STOP_DEV: IO fails, `del` cleans up
    assert _gone(dev)
    p = run(["dd", f"if={dev['path']}", "of=/dev/null", "bs=4k", "count=1", "iflag=direct"],
            check=False, timeout=60)
    assert p.returncode != 0


def test_partial_keeps_a_subset_of_whole_writes(devices, scratch):
    img = _file(scratch)
    dev = devices.add("-t", "loop", "-f", img, "--powercut")
    old = [pattern(4 * KB, 100 + i) for i in range(64)]
    new = [pattern(4 * KB, 200 + i) for i in range(64)]
    for i in range(64):
        pwrite_direct(dev["path"], old[i], i * 64 * KB)
    fd = os.open(dev["path"], os.O_RDWR)
    os.fsync(fd)
    os.close(fd)
    for i in range(64):
        pwrite_direct(dev["path"], new[i], i * 64 * KB)
    cli("seed", str(dev["id"]), "7")
    r = powercut(dev, "--partial")
    assert r["dropped"] + r["kept"] == 64 and 10 < r["kept"] < 54, r
    states = []
    for i in range(64):
        got = _read_file(img, i * 64 * KB, 4 * KB)
        assert got in (old[i], new[i]), f"write {i} is torn"
        states.append(got == new[i])
    assert sum(states) == r["kept"]


def test_ext4_survives_powercut_under_load(devices, scratch):
    img = _file(scratch, size=256 << 20)
    dev = devices.add("-t", "loop", "-f", img, "--powercut")
    mnt = os.path.join(scratch, "mnt")
    os.makedirs(mnt)
    run(["mkfs.ext4", "-q", "-F", dev["path"]])
    # commit=60: the only FLUSHes are the ones the workload asks for with fsync
    run(["mount", "-o", "commit=60", dev["path"], mnt])
    direct = os.path.join(mnt, "direct")
    with open(direct, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 1 << 20)
        os.fsync(f.fileno())
    stop, fsyncs = threading.Event(), threading.Event()
    fsyncs.set()

    def load():
        i = 0
        while not stop.is_set():
            try:
                with open(os.path.join(mnt, f"f{i % 200}"), "wb") as f:
                    f.write(pattern(8 * KB + (i % 13) * 1024, i))
                    if i % 7 == 0 and fsyncs.is_set():
                        os.fsync(f.fileno())
                if i % 50 == 0:
                    os.rename(os.path.join(mnt, f"f{i % 200}"), os.path.join(mnt, f"r{i}"))
            except OSError:
                return  # the power is gone
            i += 1

    th = threading.Thread(target=load)
    th.start()
    try:
        time.sleep(3)
        # from here on nothing asks for a FLUSH: what reaches the device now is not durable
        fsyncs.clear()
        time.sleep(0.5)
        fd = os.open(direct, os.O_WRONLY | os.O_DIRECT)
        try:
            _write(fd, pattern(64 * KB, 99), 0)
        finally:
            os.close(fd)
        r = powercut(dev)
    finally:
        stop.set()
        th.join(30)
        # the old mount only sees EIO now; let it go
        if subprocess.run(["umount", mnt], capture_output=True, timeout=60).returncode:
            run(["umount", "-l", mnt])
    assert r["dropped"] > 0, r
    cli("del", str(dev["id"]), timeout=60)
    devices.ids.remove(dev["id"])
    # what a reboot does: the same disk, the journal replays at mount
    again = devices.add("-t", "loop", "-f", img)
    run(["mount", again["path"], mnt])
    names = os.listdir(mnt)
    with open(direct, "rb") as f:
        assert f.read(64 * KB) != pattern(64 * KB, 99), "an unflushed direct write survived"
    run(["umount", mnt])
    assert any(n.startswith(("f", "r")) for n in names), names
    p = run(["fsck.ext4", "-fn", again["path"]], check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_powercut_needs_the_log(devices):
    dev = devices.add("-t", "mem", "--size", "16M")
    p = cli("powercut", str(dev["id"]), check=False)
    assert p.returncode == 1 and "add it with --powercut" in p.stderr
    assert "\n" not in p.stderr.strip()


def test_powercut_then_recover_mem(devices):
    dev = devices.add("-t", "mem", "--size", "64M", "--recovery", "--powercut")
    a, b, c = (pattern(16 * KB, i) for i in range(10, 13))
    pwrite_direct(dev["path"], a, 0)
    fd = os.open(dev["path"], os.O_RDWR)
    os.fsync(fd)
    os.close(fd)
    pwrite_direct(dev["path"], b, 0)
    pwrite_direct(dev["path"], c, 1 << 20)
    r = powercut(dev)
    assert r["dropped"] == 2 and r["recovery"], r
    cli("recover", str(dev["id"]), timeout=120)
    # the same device, the data a power loss leaves
    assert pread_direct(dev["path"], 16 * KB, 0) == a
    assert pread_direct(dev["path"], 16 * KB, 1 << 20) == bytes(16 * KB)
    # the new daemon keeps a write log of its own
    pwrite_direct(dev["path"], b, 0)
    assert powercut(dev)["dropped"] == 1
    cli("recover", str(dev["id"]), timeout=120)
    assert pread_direct(dev["path"], 16 * KB, 0) == a
