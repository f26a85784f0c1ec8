"""`ublkshell demo`: the end-to-end tour on an embedded default.

A mem device, ext4 on it, files written, remounted and checked, fsck, a fio
verify pass, then the device is deleted. On a kernel without ublk_drv it
re-runs itself inside the bundled VM, or with --no-vm serves the device
through the FUSE transport and a loop device.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

from .kernel.ctrl import CONTROL_PATH, NO_DRIVER_HINT
from .errors import UblkError
from .units import human


def _step(msg: str) -> float:
    print(f"demo: {msg}", flush=True)
    return time.monotonic()


def _run(argv: list[str], what: str, timeout: float = 600) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise UblkError(f"{what}: {argv[0]} is not installed (scripts/setup.sh installs it)") from None
    except subprocess.TimeoutExpired:
        raise UblkError(f"{what}: {argv[0]} did not finish in {timeout:.0f} s") from None
    if p.returncode:
        last = (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit {p.returncode}"]
        raise UblkError(f"{what}: {last[0]}")
    return p.stdout


def run_demo(size: str, allow_vm: bool = True) -> int:
    from .units import parse_size

    nbytes = parse_size(size, "--size")
    transport = "ublk"
    if not os.path.exists(CONTROL_PATH):
        if allow_vm:
            _step("this kernel has no ublk_drv: running the demo inside the bundled VM")
            from .vm.harness import run

            return run([sys.executable, "-m", "ublkshell", "demo", "--size", size, "--no-vm"])
        if not os.path.exists("/dev/fuse"):
            raise UblkError(NO_DRIVER_HINT.format(path=CONTROL_PATH) + " (and there is no /dev/fuse either)")
        transport = "fuse"
    if os.geteuid() != 0:
        raise UblkError("the demo creates a block device and mounts it: run it as root")

    from .devices.ids import name as dev_name
    from .devices.lifecycle import add, delete, list_devices
    from .devices.targets import build_spec

    if transport == "fuse":
        t0 = _step(f"this kernel has no ublk_drv: a {human(nbytes)} mem device through the FUSE transport "
                   "and a loop device")
        dev = add(build_spec("mem", size=size, queues=1, depth=64, transport="fuse", loop=True))
        blk = dev["loop"]
    else:
        t0 = _step(f"adding a {human(nbytes)} mem device")
        dev = add(build_spec("mem", size=size, queues=2, depth=64))
        blk = f"/dev/ublkb{dev['id']}"
    mnt = tempfile.mkdtemp(prefix="ublkshell-demo-")
    mounted = False
    try:
        _step(f"{blk} is served by daemon pid {dev['pid']} ({dev['queues']} queues x {dev['depth']})")
        _step("mkfs.ext4")
        _run(["mkfs.ext4", "-q", "-F", blk], "mkfs.ext4")
        _run(["mount", blk, mnt], "mount")
        mounted = True
        sums = {}
        _step("writing 64 files of random data")
        for i in range(64):
            data = os.urandom(4096 * (1 + i % 16))
            with open(os.path.join(mnt, f"file{i:02d}"), "wb") as f:
                f.write(data)
            sums[f"file{i:02d}"] = hashlib.sha256(data).hexdigest()
        _run(["umount", mnt], "umount")
        mounted = False
        _step("remounting and checking every file")
        _run(["mount", blk, mnt], "mount")
        mounted = True
        for name, digest in sums.items():
            with open(os.path.join(mnt, name), "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != digest:
                    raise UblkError(f"demo: {name} came back different")
        _run(["umount", mnt], "umount")
        mounted = False
        _step("fsck.ext4 -fn: " + _run(["fsck.ext4", "-fn", blk], "fsck").strip().splitlines()[-1])
        if shutil.which("fio"):
            _step("fio: 4k random writes with crc32c verify over 32M")
            _run(["fio", "--name=verify", f"--filename={blk}", "--rw=randwrite", "--bs=4k",
                  "--size=32M", "--ioengine=io_uring", "--direct=1", "--iodepth=16",
                  "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0"], "fio")
        for d in list_devices():
            if d["id"] == dev["id"]:
                _step(f"list: dev {dev_name(d['id'])} {d['state']} {human(d['size'])} {d['target']}")
    finally:
        if mounted:
            subprocess.run(["umount", mnt], capture_output=True)
        os.rmdir(mnt)
        delete(dev["id"])
        _step(f"deleted {blk}")
    _step(f"all good in {time.monotonic() - t0:.1f} s")
    return 0
