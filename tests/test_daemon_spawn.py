"""How device daemons are started: independent of the caller's working
directory, and never left behind as zombies or orphans when they fail."""
import os
import subprocess
import sys

import pytest

from ublkshell.devices import spawn as devices
from ublkshell.errors import UblkError

FUSE_OK = os.geteuid() == 0 and os.path.exists("/dev/fuse")


def _children(state=None) -> list[int]:
    me = os.getpid()
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and (state is None or fields[0] == state):
            out.append(int(pid))
    return out


@pytest.mark.skipif(not FUSE_OK, reason="the FUSE transport needs root and /dev/fuse")
def test_a_checkout_in_the_working_directory_does_not_shadow_the_package(tmp_path):
    """Run from a directory holding another `ublkshell` (a source checkout without its
    compiled extension): the command and its daemon both use the installed package."""
    shadow = tmp_path / "checkout" / "ublkshell"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the copy in the working directory')\n")
    script = os.path.join(os.path.dirname(sys.executable), "ublkshell")
    env = {**os.environ, "UBLKSHELL_STATE_DIR": str(tmp_path / "state"),
           "UBLKSHELL_DATA_DIR": str(tmp_path / "data")}
    p = subprocess.run([script, "add", "--transport", "fuse", "-t", "null", "--size", "16M", "--json"],
                       capture_output=True, text=True, timeout=60, cwd=shadow.parent, env=env)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([script, "del", "fuse0"], capture_output=True, text=True, timeout=60,
                       cwd=shadow.parent, env=env)
    assert p.returncode == 0, p.stderr


@pytest.fixture
def daemon_module(tmp_path, monkeypatch):
    """Write a stand-in daemon module where spawned daemons will import it from."""
    mods = tmp_path / "mods"
    mods.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(mods))
    monkeypatch.setenv("UBLKSHELL_STATE_DIR", str(tmp_path / "state"))
    return lambda name, code: (mods / f"{name}.py").write_text(code)


def test_a_daemon_that_never_answers_is_killed_and_reaped(daemon_module):
    daemon_module("hangs_forever", "import time\nwhile True:\n    time.sleep(1)\n")
    before = set(_children())
    with pytest.raises(UblkError, match=r"^the device daemon did not start within 2 s \(log: .*daemon-.*\.log\)$"):
        devices.spawn_daemon({"target": "null"}, timeout=2, module="hangs_forever")
    assert set(_children()) == before  # neither running nor a zombie


def test_a_daemon_that_dies_at_once_is_reaped_with_its_last_words(tmp_path, daemon_module):
    daemon_module("dies", "import sys\nprint('cannot do it', file=sys.stderr)\nsys.exit(3)\n")
    before = set(_children())
    with pytest.raises(UblkError, match=r"^the device daemon exited \(3\) before serving: cannot do it$"):
        devices.spawn_daemon({"target": "null"}, timeout=20, module="dies")
    assert set(_children()) == before
    logs = os.listdir(tmp_path / "state" / "log")
    assert len(logs) == 1 and oct(os.stat(tmp_path / "state" / "log" / logs[0]).st_mode & 0o777) == "0o600"
