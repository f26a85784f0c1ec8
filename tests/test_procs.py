"""Signals reach only our own daemons (ublkshell/procs.py): a pid in a registry
entry may have been reused by any process since the daemon died."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ublkshell import procs

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open (Linux 5.3)")


@pytest.fixture
def stand_in():
    """A process whose command line names our daemon module (what is_daemon looks for)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "ublkshell.bridge.daemon"])
    yield p
    p.kill()
    p.wait()


@pytest.fixture
def bystander():
    p = subprocess.Popen(["sleep", "120"])
    yield p
    p.kill()
    p.wait()


def test_start_time_is_this_processes_identity(stand_in):
    assert procs.start_time(os.getpid()) == procs.start_time(os.getpid())
    assert procs.start_time(stand_in.pid) >= procs.start_time(os.getpid())
    assert procs.start_time(2**22 + 7) is None and procs.start_time("1") is None
    assert procs.me() == {"pid": os.getpid(), "pid_start": procs.start_time(os.getpid())}


def test_only_a_daemon_with_the_recorded_start_time_is_signalled(stand_in, bystander):
    start = procs.start_time(stand_in.pid)
    # another program under the pid: not ours
    assert not procs.signal_daemon(bystander.pid, signal.SIGTERM)
    # our module, but started at another time: the pid was reused by another daemon
    assert not procs.signal_daemon(stand_in.pid, signal.SIGTERM, start + 1)
    assert bystander.poll() is None and stand_in.poll() is None
    for bad in (None, 0, -1, True, "5", 2**40):
        assert not procs.signal_daemon(bad, signal.SIGTERM)
    assert procs.signal_daemon(stand_in.pid, signal.SIGTERM, start)
    assert stand_in.wait(timeout=10) == -signal.SIGTERM
    # gone (a zombie until reaped, then nothing): never again
    assert not procs.signal_daemon(stand_in.pid, signal.SIGTERM, start)


def test_zombies_are_not_alive():
    p = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while procs.alive(p.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not procs.alive(p.pid)  # exited, not yet reaped
    p.wait()


def _entry(tmp_path, name, **fields):
    d = tmp_path / "state" / "devices"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(tmp_path / "state", 0o700)
    (d / f"{name}.json").write_text(json.dumps(fields))


def test_verbs_never_signal_a_process_that_reused_a_daemons_pid(tmp_path, bystander):
    """Registry entries whose pid now belongs to an unrelated process: del and
    powercut act on the device and leave that process alone."""
    env = {**os.environ, "UBLKSHELL_STATE_DIR": str(tmp_path / "state"),
           "UBLKSHELL_DATA_DIR": str(tmp_path / "data")}
    _entry(tmp_path, "fuse7", id=(1 << 20) + 7, pid=bystander.pid, pid_start=procs.start_time(bystander.pid),
           transport="fuse", spec={"target": "mem"}, mount=str(tmp_path / "nowhere"))
    _entry(tmp_path, "3", id=3, pid=bystander.pid, spec={"target": "mem", "powercut": 1 << 20})

    def run(*args):
        return subprocess.run([sys.executable, "-m", "ublkshell", *args], capture_output=True, text=True,
                              timeout=60, env=env)

    p = run("powercut", "3")
    assert p.returncode == 1
    assert p.stderr.strip() == f"ublkshell: device 3: its daemon (pid {bystander.pid}) is not running"
    p = run("del", "fuse7")
    assert p.returncode == 0, p.stderr
    assert bystander.poll() is None
    assert not (tmp_path / "state" / "devices" / "fuse7.json").exists()
