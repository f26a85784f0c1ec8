"""Fixtures for tests against the real ublk_drv (they run inside the bundled VM).

Everything that can block (a CLI call, dd, fio) runs as a subprocess with a
timeout: a wedged device must fail a test, never hang the suite.
"""
import json
import os
import subprocess
import sys
import time

import pytest

CONTROL = "/dev/ublk-control"


HERE = os.path.dirname(os.path.abspath(__file__))


# The basics (marker `basics`): what scripts/test.sh also runs on Debian's stable kernel (6.12),
# whose ublk_drv lacks batch IO, automatic buffer registration, resize and quiesce, so the
# paths ublkshell falls back to are run on a kernel that needs them. Whole files, or one test
# (with its parameters) of a file. test_feature_fallbacks.py marks itself.
BASICS = {
    "test_lifecycle.py",
    "test_consumers.py::test_fio_verify[4k-mem]",
    "test_consumers.py::test_fio_verify[128k-loop-ext4]",
    "test_consumers.py::test_ext4_end_to_end[loop-ext4]",
    "test_faults.py::test_fail_range_only_there[mem]",
    "test_faults.py::test_delay_in_histogram_and_fio",
    "test_faults.py::test_ext4_goes_read_only_on_write_error",
    "test_faults.py::test_corrupt_write_flips_the_named_byte[loop]",
    "test_observe.py::test_stats_count_exactly_what_fio_wrote",
    "test_observe.py::test_trace_shows_what_dd_issued",
    "test_recovery.py::test_kill_without_recovery_fails_io_and_del_cleans_up",
    "test_recovery.py::test_io_waits_while_dead_and_completes_after_recover[loop]",
    "test_powercut.py::test_unflushed_lost_flushed_kept",
    # every control command of a user's device carries its node there too (GET_DEV_INFO2)
    "test_unprivileged.py",
}


def pytest_collection_modifyitems(items):
    # every test in this directory needs the real driver; the host run deselects them
    for item in items:
        if str(item.path).startswith(HERE + os.sep):
            item.add_marker(pytest.mark.vm)
            if item.path.name in BASICS or f"{item.path.name}::{item.name}" in BASICS:
                item.add_marker(pytest.mark.basics)


@pytest.fixture(autouse=True)
def _real_driver():
    if not os.path.exists(CONTROL):
        pytest.fail("this test needs the real ublk_drv (/dev/ublk-control is missing): "
                    "run it through scripts/test.sh, which boots the bundled VM")
    if os.geteuid() != 0:
        pytest.fail("ublk control needs root")


def run(argv, timeout=120, check=True, **kw):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode:
        raise AssertionError(f"{argv} exited {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p


# Verbs that run until stopped, or start a server or shell, always get a process of their own.
OWN_PROCESS = {"serve", "demo", "top", "vm", "trace", "crashtest"}


def cli(*args, timeout=180, check=True, process=False):
    """`ublkshell ARGS` -> a CompletedProcess.

    Under software emulation a fresh interpreter costs 3-4 s before the verb
    runs, most of a test's time; so a verb runs through the same entry point
    (ublkshell.cli.main: parsing, validation, one-line errors, exit status) in
    this process. process=True, and the long-running verbs, start the real
    command; the tests of the command's own face (help, exit codes) use it."""
    if process or not args or args[0].startswith("-") or args[0] in OWN_PROCESS:
        return run([sys.executable, "-m", "ublkshell", *args], timeout=timeout, check=check)
    return _cli_here(list(args), timeout, check)


def _cli_here(argv, timeout, check):
    import contextlib
    import faulthandler
    import io

    from ublkshell.cli import main

    out, err = io.StringIO(), io.StringIO()
    # a wedged verb must fail the run loudly (tracebacks, then exit), never hang it
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse: --help, bad options
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    finally:
        faulthandler.cancel_dump_traceback_later()
    p = subprocess.CompletedProcess(["ublkshell", *argv], rc, out.getvalue(), err.getvalue())
    if check and p.returncode:
        raise AssertionError(f"{p.args} exited {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def errno_of(fn, *args) -> int:
    """The errno fn(*args) fails with, 0 if it succeeds."""
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


def await_writes(dev_id: int, n: int, fio, after: str) -> None:
    """Return once the device has completed n more writes while fio runs: a loop that
    breaks a device under load is paced by IO, not by time (emulation speed varies)."""
    from ublkshell.verbs import run_stats

    def writes():
        return run_stats({"id": dev_id, "histograms": False})["ops"]["write"]["ios"]

    mark, deadline = writes(), time.monotonic() + 120
    while writes() < mark + n:
        assert fio.poll() is None, f"fio ended after {after}: {fio.communicate()}"
        assert time.monotonic() < deadline, f"no IO after {after}"
        time.sleep(0.05)


class Devices:
    """Creates devices through the CLI and deletes whatever is left at teardown."""

    def __init__(self):
        self.ids = []

    def add(self, *args) -> dict:
        p = cli("add", *args, "--json")
        dev = json.loads(p.stdout)
        self.ids.append(dev["id"])
        dev["path"] = f"/dev/ublkb{dev['id']}"
        return dev

    def cleanup(self):
        for dev_id in self.ids:
            if os.path.exists(f"/dev/ublkc{dev_id}"):
                cli("del", str(dev_id), check=False, timeout=60)


@pytest.fixture
def devices():
    d = Devices()
    yield d
    d.cleanup()
    left = [n for n in os.listdir("/dev") if n.startswith("ublkc")]
    assert not left, f"devices left behind: {left}"


@pytest.fixture
def scratch(tmp_path_factory):
    """A directory on the guest's tmpfs (never on the shared host filesystem)."""
    d = f"/dev/shm/ublkshell-test-{os.getpid()}-{time.monotonic_ns()}"
    os.makedirs(d)
    yield d
    subprocess.run(["rm", "-rf", d])


def pattern(nbytes: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(nbytes)


def pwrite_direct(path: str, data: bytes, offset: int) -> None:
    import mmap

    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, len(data))
        buf.write(data)
        assert os.pwritev(fd, [buf], offset) == len(data)
    finally:
        os.close(fd)


def pread_direct(path: str, nbytes: int, offset: int) -> bytes:
    import mmap

    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, nbytes)
        assert os.preadv(fd, [buf], offset) == nbytes
        return bytes(buf)
    finally:
        os.close(fd)


class Backing:
    """Where a loop target's data lives: a file on tmpfs (served in the queue
    thread), a file on ext4 (served through io_uring), or a block device."""

    def __init__(self, scratch):
        self.scratch = scratch
        self.loops = []
        self.mounts = []

    def _kernel_loop(self, size: int) -> str:
        img = os.path.join(self.scratch, f"lower{len(self.loops)}.img")
        with open(img, "wb") as f:
            f.truncate(size)
        dev = run(["losetup", "--find", "--show", img]).stdout.strip()
        self.loops.append(dev)
        return dev

    def make(self, kind: str, size: int, name: str = "disk.img") -> str:
        if kind == "tmpfs":
            path = os.path.join(self.scratch, name)
            with open(path, "wb") as f:
                f.truncate(size)
            return path
        if kind == "ext4":
            dev = self._kernel_loop(size + (64 << 20))
            run(["mkfs.ext4", "-q", "-F", dev])
            mnt = os.path.join(self.scratch, f"mnt{len(self.mounts)}")
            os.makedirs(mnt)
            run(["mount", dev, mnt])
            self.mounts.append(mnt)
            path = os.path.join(mnt, name)
            with open(path, "wb") as f:
                f.truncate(size)
            return path
        if kind == "bdev":
            return self._kernel_loop(size)
        raise ValueError(kind)

    def cleanup(self):
        for m in reversed(self.mounts):
            # still busy (a test that failed with a file open): detached lazily, never left
            if run(["umount", m], check=False).returncode != 0:
                run(["umount", "-l", m], check=False)
        for d in reversed(self.loops):
            run(["losetup", "-d", d], check=False)


@pytest.fixture
def backing(scratch):
    b = Backing(scratch)
    yield b
    b.cleanup()


LOOP_BACKINGS = ["tmpfs", "ext4", "bdev"]
