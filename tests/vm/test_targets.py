"""null, mem and loop served for real: data round trips, every queue shape."""
import os

import pytest

from .conftest import LOOP_BACKINGS, cli, pattern, pread_direct, pwrite_direct, run

SHAPES = [(1, 1), (1, 128), (2, 1), (2, 128)]


@pytest.mark.parametrize("queues,depth", SHAPES)
def test_null_reads_zeros_and_accepts_writes(devices, queues, depth):
    dev = devices.add("-t", "null", "--size", "1G", "-q", str(queues), "-d", str(depth))
    assert dev["queues"] == queues and dev["depth"] == depth
    with open(dev["path"], "rb") as f:
        assert f.seek(0, 2) == 1 << 30
    pwrite_direct(dev["path"], pattern(1 << 20, 1), 4096)
    # the write went nowhere: reads still return zeros, even from the tag buffers it used
    assert pread_direct(dev["path"], 1 << 20, 4096) == bytes(1 << 20)


@pytest.mark.parametrize("queues,depth", SHAPES)
def test_mem_round_trip(devices, queues, depth):
    dev = devices.add("-t", "mem", "--size", "64M", "-q", str(queues), "-d", str(depth))
    data = pattern(3 << 20, queues * 1000 + depth)
    pwrite_direct(dev["path"], data, 5 << 20)
    assert pread_direct(dev["path"], len(data), 5 << 20) == data
    # never written: sparse memory reads as zeros
    assert pread_direct(dev["path"], 1 << 20, 40 << 20) == bytes(1 << 20)


@pytest.mark.parametrize("kind", LOOP_BACKINGS)
@pytest.mark.parametrize("queues,depth", SHAPES)
def test_loop_bytes_reach_the_backing_file(devices, backing, queues, depth, kind):
    img = backing.make(kind, 64 << 20)
    dev = devices.add("-t", "loop", "-f", img, "-q", str(queues), "-d", str(depth))
    assert dev["size"] == 64 << 20
    data = pattern(2 << 20, depth)
    pwrite_direct(dev["path"], data, 7 << 20)
    run(["sync"])
    with open(img, "rb") as f:
        f.seek(7 << 20)
        assert f.read(len(data)) == data
    # and the other way: what is in the file is what the device reads
    other = pattern(1 << 20, 99)
    with open(img, "r+b") as f:
        f.seek(20 << 20)
        f.write(other)
        f.flush()
        os.fsync(f.fileno())
    assert pread_direct(dev["path"], len(other), 20 << 20) == other


@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
def test_loop_reads_past_the_file_end_are_zeros(devices, backing, kind):
    img = backing.make(kind, 0, "short.img")
    with open(img, "wb") as f:
        f.write(pattern(1 << 20, 5))
    dev = devices.add("-t", "loop", "-f", img, "--size", "8M")
    assert dev["size"] == 8 << 20
    got = pread_direct(dev["path"], 2 << 20, 0)
    assert got[: 1 << 20] == pattern(1 << 20, 5)
    assert got[1 << 20:] == bytes(1 << 20)


@pytest.mark.parametrize("target", ["mem", "loop-tmpfs", "loop-ext4", "loop-bdev"])
def test_discard_and_write_zeroes(devices, backing, target):
    if target.startswith("loop"):
        img = backing.make(target[5:], 32 << 20)
        dev = devices.add("-t", "loop", "-f", img)
    else:
        dev = devices.add("-t", "mem", "--size", "32M")
    data = pattern(8 << 20, 7)
    pwrite_direct(dev["path"], data, 0)
    run(["blkdiscard", "-o", str(1 << 20), "-l", str(1 << 20), dev["path"]])
    run(["blkdiscard", "-z", "-o", str(4 << 20), "-l", str(2 << 20), dev["path"]])
    got = pread_direct(dev["path"], 8 << 20, 0)
    assert got[: 1 << 20] == data[: 1 << 20]
    assert got[1 << 20: 2 << 20] == bytes(1 << 20), "discarded range should read zeros"
    assert got[2 << 20: 4 << 20] == data[2 << 20: 4 << 20]
    assert got[4 << 20: 6 << 20] == bytes(2 << 20), "write-zeroes range should read zeros"
    assert got[6 << 20:] == data[6 << 20:]
    if target.startswith("loop"):
        run(["sync"])
        with open(img, "rb") as f:
            f.seek(1 << 20)
            assert f.read(1 << 20) == bytes(1 << 20)
            f.seek(4 << 20)
            assert f.read(2 << 20) == bytes(2 << 20)
            f.seek(6 << 20)
            assert f.read(2 << 20) == data[6 << 20:]


def test_list_shows_what_was_added(devices, scratch):
    a = devices.add("-t", "mem", "--size", "16M", "-q", "2", "-d", "32")
    out = cli("list").stdout
    line = next(l for l in out.splitlines() if l.split()[:1] == [str(a["id"])])
    assert "LIVE" in line and "mem" in line and "2 x 32" in line and str(a["pid"]) in line
    js = __import__("json").loads(cli("list", "--json").stdout)
    d = next(d for d in js if d["id"] == a["id"])
    assert d["size"] == 16 << 20 and d["daemon_alive"] and d["state"] == "LIVE"
    assert "cmd_ioctl_encode" in d["flags"]


def test_features_names_what_the_kernel_says(devices):
    js = __import__("json").loads(cli("features", "--json").stdout)
    assert js["mask"] & (1 << 6), "7.x kernels support ioctl-encoded commands"
    assert js["features"]["cmd_ioctl_encode"] and js["features"]["user_recovery"]
    text = cli("features").stdout
    assert f"0x{js['mask']:x}" in text


def pattern_bytes(offset: int, nbytes: int) -> bytes:
    """What the pattern target reads: every 8-byte word is its own byte offset, big-endian."""
    return b"".join((offset + i).to_bytes(8, "big") for i in range(0, nbytes, 8))


@pytest.mark.parametrize("queues,depth", [(1, 128), (2, 1)])
def test_pattern_reads_its_offsets_and_is_read_only(devices, queues, depth):
    dev = devices.add("-t", "pattern", "--size", "64M", "-q", str(queues), "-d", str(depth))
    assert pread_direct(dev["path"], 1 << 20, 5 << 20) == pattern_bytes(5 << 20, 1 << 20)
    assert pread_direct(dev["path"], 4096, (64 << 20) - 4096) == pattern_bytes((64 << 20) - 4096, 4096)
    with open(f"/sys/block/{os.path.basename(dev['path'])}/ro") as f:
        assert f.read().strip() == "1"
    with pytest.raises(OSError):
        pwrite_direct(dev["path"], bytes(4096), 0)
