"""Real consumers on real devices: fio verify, ext4 end to end."""
import os
import subprocess

import pytest

from .conftest import run


def fio_verify(path, bs, size="32M", iodepth=32, extra=()):
    return run(["fio", "--name=verify", f"--filename={path}", "--rw=randwrite", f"--bs={bs}",
                f"--size={size}", "--ioengine=io_uring", "--direct=1", f"--iodepth={iodepth}",
                "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=terse",
                *extra], timeout=600)


def _device(devices, backing, target, queues=1):
    if target.startswith("loop"):
        img = backing.make(target[5:], 128 << 20)
        return devices.add("-t", "loop", "-f", img, "-q", str(queues))
    return devices.add("-t", "mem", "--size", "128M", "-q", str(queues))


@pytest.mark.parametrize("target", ["mem", "loop-tmpfs", "loop-ext4", "loop-bdev"])
@pytest.mark.parametrize("bs", ["4k", "128k"])
def test_fio_verify(devices, backing, target, bs):
    dev = _device(devices, backing, target, queues=2)
    p = fio_verify(dev["path"], bs)
    # terse v3: field 5 is the error count of the job
    fields = p.stdout.strip().splitlines()[-1].split(";")
    assert fields[4] == "0", p.stdout


@pytest.mark.parametrize("target", ["mem", "loop-tmpfs", "loop-ext4"])
def test_ext4_end_to_end(devices, backing, scratch, target):
    dev = _device(devices, backing, target)
    mnt = os.path.join(scratch, "mnt")
    os.makedirs(mnt)
    run(["mkfs.ext4", "-q", "-F", dev["path"]])
    run(["mount", dev["path"], mnt])
    try:
        blobs = {f"f{i}": os.urandom(1000 * (i + 1)) for i in range(50)}
        for name, data in blobs.items():
            with open(os.path.join(mnt, name), "wb") as f:
                f.write(data)
        os.makedirs(os.path.join(mnt, "d/e/f"))
        run(["sync"])
    finally:
        run(["umount", mnt])
    run(["mount", "-o", "ro", dev["path"], mnt])
    try:
        for name, data in blobs.items():
            with open(os.path.join(mnt, name), "rb") as f:
                assert f.read() == data
        assert os.path.isdir(os.path.join(mnt, "d/e/f"))
    finally:
        run(["umount", mnt])
    p = subprocess.run(["fsck.ext4", "-fn", dev["path"]], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
