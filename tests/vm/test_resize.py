"""`resize` on the real driver: ext4 grows with the device and stays clean, a shrink below
a filesystem is refused, mem gives back its memory and loop grows its file."""
import json
import os

from ublkshell.observe.schema import check

from .conftest import cli, pattern, pread_direct, pwrite_direct, run


def size_of(path: str) -> int:
    return int(run(["blockdev", "--getsize64", path]).stdout)


def test_grow_under_a_mounted_ext4_then_resize2fs(devices, scratch):
    dev = devices.add("-t", "mem", "--size", "64M")
    path, name = dev["path"], str(dev["id"])
    run(["mkfs.ext4", "-q", "-F", path])
    mnt = os.path.join(scratch, "mnt")
    os.makedirs(mnt)
    run(["mount", path, mnt])
    try:
        data = pattern(3 << 20, 5)
        with open(os.path.join(mnt, "before"), "wb") as f:
            f.write(data)
        run(["sync"])
        out = cli("resize", name, "+64M").stdout
        assert "64M -> 128M" in out and size_of(path) == 128 << 20
        run(["resize2fs", path])
        # the filesystem uses the new space: a file larger than the old device fits
        with open(os.path.join(mnt, "after"), "wb") as f:
            f.write(pattern(80 << 20, 6))
        with open(os.path.join(mnt, "before"), "rb") as f:
            assert f.read() == data
        # below the filesystem: refused, one line, nothing changed
        p = cli("resize", name, "64M", check=False)
        assert p.returncode == 2 and "filesystem on" in p.stderr and "would cut it" in p.stderr, p.stderr
        assert len(p.stderr.splitlines()) == 1 and size_of(path) == 128 << 20
    finally:
        run(["umount", mnt])
    run(["fsck.ext4", "-fn", path])
    listed = {d["id"]: d for d in json.loads(cli("list", "--json").stdout)}
    assert listed[dev["id"]]["size"] == 128 << 20
    info = json.loads(cli("info", name, "--json").stdout)
    assert info["list"]["size"] == 128 << 20


def test_mem_shrinks_with_force_and_keeps_what_is_left(devices):
    dev = devices.add("-t", "mem", "--size", "32M")
    path, name = dev["path"], str(dev["id"])
    head, tail = pattern(1 << 20, 1), pattern(1 << 20, 2)
    pwrite_direct(path, head, 0)
    pwrite_direct(path, tail, 30 << 20)
    r = json.loads(cli("resize", name, "16M", "--json").stdout)
    check("resize", r)
    assert (r["old_size"], r["size"]) == (32 << 20, 16 << 20) and size_of(path) == 16 << 20
    assert pread_direct(path, 1 << 20, 0) == head
    # grown again: the sectors given back read as zeros, not as what was there
    cli("resize", name, "32M")
    assert pread_direct(path, 1 << 20, 30 << 20) == bytes(1 << 20)
    assert pread_direct(path, 1 << 20, 0) == head


def test_loop_grows_its_file_sparse_and_never_truncates_it(devices, scratch):
    img = os.path.join(scratch, "disk.img")
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    dev = devices.add("-t", "loop", "-f", img)
    path, name = dev["path"], str(dev["id"])
    cli("resize", name, "48M")
    assert os.path.getsize(img) == 48 << 20 and size_of(path) == 48 << 20
    data = pattern(1 << 20, 3)
    pwrite_direct(path, data, 40 << 20)
    assert pread_direct(path, 1 << 20, 40 << 20) == data
    cli("resize", name, "8M", "--force")
    assert size_of(path) == 8 << 20 and os.path.getsize(img) == 48 << 20  # the user's file is kept whole
    # the path now names another file: resize refuses to grow what the daemon does not serve
    os.rename(img, img + ".old")
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    p = cli("resize", name, "16M", check=False)
    assert p.returncode == 1 and "no longer the file" in p.stderr and os.path.getsize(img) == 1 << 20


def test_bad_sizes_are_one_line(devices):
    dev = devices.add("-t", "null", "--size", "64M", "--block-size", "4k")
    name = str(dev["id"])
    for args, words in ((["1000"], "not a whole number of 4096-byte blocks"), (["soon"], "not a size"),
                        (["0"], "greater than zero"), (["+2E"], "out of range")):
        p = cli("resize", name, *args, check=False)
        assert p.returncode == 2 and words in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
    p = cli("resize", "999", "1G", check=False)
    assert p.returncode == 1 and "device 999 does not exist" in p.stderr
    # null has no store: any size, and the kernel follows
    cli("resize", name, "1T")
    assert size_of(dev["path"]) == 1 << 40
