"""Devices of users who are not root (UBLK_F_UNPRIVILEGED_DEV; docs/security.md,
"Unprivileged devices"), against the real driver, with two users.

The users are numeric ids with no passwd entry (the guest shares the host's /etc, which
nothing here may change): A = 60001, B = 60002, both in the admin's group 60100, which
gets /dev/ublk-control as the udev rule would (devtmpfs: guest-only); C = 60003 is in no
such group. Each runs with its own XDG_RUNTIME_DIR on the guest's /run (tmpfs), as a
login session would have.

udev: the host has no udevd to run in the guest (the `udev` package is not installed,
and installing it would change the host's /etc), so a thread of this test plays udev:
it runs our verb's entry point, `ublkshell udev add NAME` (ublkshell.devices.udev.main), as root
for every ublkcN/ublkbN node that appears, exactly as the rule's RUN line would.

The users' interpreter: the venv's python lives under /root (0700 on the host), so the
users run the system python of the same version with the venv's site-packages and this
checkout on PYTHONPATH (both readable by everyone); nothing on the host is chmod-ed.

A's server mounts its own stats tree through the setuid fusermount3, which looks the user
up ("fusermount3: could not determine username" without an entry): the test gives A, B and
C passwd entries in the guest only, by bind-mounting a copy of /etc/passwd with their lines
over it (a mount in the guest's namespace; the host's file is never written), and opens
/dev/fuse to users as distributions' udev rules do.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time

import pytest

from ublkshell import procs
from ublkshell._native import lib

from .conftest import CONTROL, cli, run

A, B, C, GROUP = 60001, 60002, 60003, 60100
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _python() -> str:
    """An interpreter every user can run (see the module's notes)."""
    real = os.path.realpath(sys.executable)
    d = os.path.dirname(real)
    while d != "/":
        if not os.stat(d).st_mode & 0o001:
            break
        d = os.path.dirname(d)
    else:
        return sys.executable
    other = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin:/bin")
    assert other, "no interpreter that a user who is not root can run"
    return other


class Udev:
    """Plays udev: every new ublk node goes through `ublkshell udev add NAME` (as root)."""

    def __init__(self):
        self.seen = set()
        self.log = []
        self.stop = threading.Event()
        self.paused = threading.Event()  # as if the admin had installed no rule
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import contextlib
        import io

        from ublkshell.devices.udev import main as udev_main

        while not self.stop.is_set():
            for n in [] if self.paused.is_set() else sorted(os.listdir("/dev")):
                if not (n.startswith("ublkc") or n.startswith("ublkb")):
                    continue
                try:
                    key = (n, os.lstat(f"/dev/{n}").st_ino)
                except FileNotFoundError:
                    continue
                if key in self.seen:
                    continue
                self.seen.add(key)
                err = io.StringIO()
                with contextlib.redirect_stderr(err):
                    rc = udev_main(["udev", "add", n])
                self.log.append((n, rc, err.getvalue().strip()))
            time.sleep(0.05)


@pytest.fixture
def setup():
    st = os.stat(CONTROL)
    os.chown(CONTROL, 0, GROUP)
    os.chmod(CONTROL, 0o660)
    for uid in (A, B, C):
        d = f"/run/user/{uid}"
        os.makedirs(d, exist_ok=True)
        os.chown(d, uid, uid)
        os.chmod(d, 0o700)
    udev = Udev()
    udev.thread.start()
    yield udev
    udev.stop.set()
    udev.thread.join(5)
    os.chown(CONTROL, st.st_uid, st.st_gid)
    os.chmod(CONTROL, st.st_mode & 0o7777)
    for dev in [n for n in os.listdir("/dev") if n.startswith("ublkc")]:
        cli("del", dev[5:], check=False, timeout=60)
    for uid in (A, B, C):
        shutil.rmtree(f"/run/user/{uid}", ignore_errors=True)


def _as(uid, groups=(GROUP,), **extra):
    argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}"]
    argv += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": f"/run/user/{uid}",
           "XDG_RUNTIME_DIR": f"/run/user/{uid}", "PYTHONDONTWRITEBYTECODE": "1", "NO_COLOR": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, sysconfig.get_paths()["purelib"]]), **extra}
    return argv, env


def _steps(uid, steps, groups=(GROUP,), wait=True, **extra):
    argv, env = _as(uid, groups, **extra)
    p = subprocess.Popen(argv + [_python(), "-P", os.path.join(HERE, "unpriv_user.py"), json.dumps(steps)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd="/")
    return _results(p) if wait else p


def _results(p):
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    return json.loads(out)


def _one_line_error(r, *words):
    assert r["rc"] in (1, 2), r
    line = r["err"].strip()
    assert "\n" not in line and line.startswith("ublkshell: "), r
    for w in words:
        assert w in line, r
    return line


@pytest.fixture
def passwd(scratch):
    # and /dev/fuse open to users, as distributions' udev rules make it (MODE="0666")
    fuse_mode = os.stat("/dev/fuse").st_mode & 0o7777
    os.chmod("/dev/fuse", 0o666)
    path = os.path.join(scratch, "passwd")
    with open("/etc/passwd") as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text + "".join(f"ublktest{u}:x:{u}:{u}::/run/user/{u}:/usr/sbin/nologin\n" for u in (A, B, C)))
    os.chmod(path, 0o644)
    run(["mount", "--bind", path, "/etc/passwd"])
    yield
    run(["umount", "/etc/passwd"], check=False)
    os.chmod("/dev/fuse", fuse_mode)


def test_two_users(setup, passwd, scratch):
    secret = os.path.join(scratch, "root-only.img")
    with open(secret, "wb") as f:
        f.truncate(16 << 20)
    os.chmod(secret, 0o600)
    os.chmod(scratch, 0o755)

    # A's own server, with its own stats tree
    argv, env = _as(A)
    server_log = open(os.path.join(scratch, "server.log"), "w+")
    server = subprocess.Popen(argv + [_python(), "-P", "-m", "ublkshell", "serve"], env=env,
                              cwd="/", stdout=subprocess.DEVNULL, stderr=server_log)
    a_sock = f"/run/user/{A}/ublkshell/ublkshell.sock"
    a_state = f"/run/user/{A}/ublkshell"
    try:
        # both users add a device at once; A also tries a file only root can read
        pa = _steps(A, [["add", "-t", "mem", "--size", "16M", "--json"],
                        ["add", "-t", "loop", "-f", secret, "--json"],
                        ["add", "-t", "mem", "--size", "16M", "--recovery"]], wait=False)
        pb = _steps(B, [["add", "-t", "mem", "--size", "16M", "--json"]], wait=False)
        a_add, a_loop, a_rec = _results(pa)
        (b_add,) = _results(pb)
        assert a_add["rc"] == 0, (a_add, setup.log)
        assert b_add["rc"] == 0, (b_add, setup.log)
        da, db = json.loads(a_add["out"]), json.loads(b_add["out"])
        _one_line_error(a_loop, secret, "permission")
        _one_line_error(a_rec, "--recovery", "not root")
        assert da["flags"] & lib.UBLK_F_UNPRIVILEGED_DEV, da
        assert not da["zero_copy"] and da["recovery"] is None, da

        # the nodes are A's, and A's IO goes through them
        for node in (f"/dev/ublkc{da['id']}", f"/dev/ublkb{da['id']}"):
            st = os.stat(node)
            assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (A, A, 0o600), (node, setup.log)
        argv, env = _as(A)
        run(argv + ["dd", "if=/dev/urandom", f"of=/dev/ublkb{da['id']}", "bs=64k", "count=32",
                    "oflag=direct", "status=none"], env=env, timeout=60)
        run(argv + ["dd", f"if=/dev/ublkb{da['id']}", "of=/dev/null", "bs=64k", "count=32",
                    "iflag=direct", "status=none"], env=env, timeout=60)

        a_id, b_id = str(da["id"]), str(db["id"])
        b_list, b_del, b_fail, b_trace, b_conn, b_state, a_list, a_stats, a_shell = (
            _steps(B, [["list", "--json"], ["del", a_id], ["fail", a_id, "op=read"],
                       ["trace", a_id, "--count", "1", "--duration", "1"], ["connect", a_sock],
                       ["listdir", a_state]])
            + _steps(A, [["list", "--json"], ["stats", a_id, "--json"], ["-c", "list"]]))
        assert b_state["rc"] == 1 and "PermissionError" in b_state["err"], b_state
        assert [d["id"] for d in json.loads(b_list["out"])] == [db["id"]], b_list
        assert [d["id"] for d in json.loads(a_list["out"])] == [da["id"]], a_list
        _one_line_error(b_del, f"device {a_id}", "not yours")
        # B's ublkshell has nothing of A's to open: no statistics, no fault table, no trace
        for r in (b_fail, b_trace):
            line = _one_line_error(r, f"device {a_id}")
            assert "not served by ublkshell" in line or "no statistics" in line, r
        assert b_conn["rc"] == 1 and "ermission denied" in b_conn["err"], b_conn
        assert a_stats["rc"] == 0 and json.loads(a_stats["out"]), a_stats
        # through A's own server
        assert a_shell["rc"] == 0 and "unprivileged_dev" in a_shell["out"], a_shell
        # A watches its device in its own tree; nobody else may enter it
        tree = f"{a_state}/stats"
        deadline = time.monotonic() + 30
        while True:
            (a_tree,) = _steps(A, [["listdir", tree]])
            if f"ublkb{a_id}" in a_tree["out"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        server_log.seek(0)
        assert a_tree["rc"] == 0 and f"ublkb{a_id}" in json.loads(a_tree["out"]), (a_tree, server_log.read())
        (a_read,) = _steps(A, [["read", f"{tree}/ublkb{a_id}/stats.json"]])
        assert a_read["rc"] == 0 and json.loads(a_read["out"])["ops"]["write"]["ios"] >= 32, a_read
        (b_tree,) = _steps(B, [["listdir", tree]])
        assert b_tree["rc"] == 1 and "PermissionError" in b_tree["err"], b_tree

        # root sees both users' devices, and deletes B's (every command carries the path)
        everyone = {d["id"]: d for d in json.loads(cli("list", "--json").stdout)}
        assert {da["id"], db["id"]} <= set(everyone) and everyone[da["id"]]["state"] == "LIVE", everyone
        cli("del", b_id, timeout=60)

        # no udev rule: the daemon's wait is bounded, its one line names the rule, and the
        # device it could not take is left for root
        setup.paused.set()
        (a_nonode,) = _steps(A, [["add", "-t", "null", "--size", "16M"]], UBLKSHELL_NODE_WAIT="2")
        line = _one_line_error(a_nonode, "still not yours", "udev-rules", "left for root")
        left = line.split("device ")[-1].split(" is left")[0]
        cli("del", left, timeout=60)
        setup.paused.clear()

        # a user without the admin's group: one line naming what is missing
        (c_add,) = _steps(C, [["add", "-t", "mem", "--size", "16M"]], groups=())
        _one_line_error(c_add, CONTROL, "permission denied", "docs/security.md")

        (a_del,) = _steps(A, [["del", a_id]])
        assert a_del["rc"] == 0, a_del
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()

    assert not [n for n in os.listdir("/dev") if n.startswith("ublk") and n != "ublk-control"]
    daemons = [p for p in os.listdir("/proc") if p.isdigit() and procs.is_daemon(int(p))]
    assert not daemons, daemons
    with open("/proc/self/mountinfo") as f:
        left = [m for m in f if "/dev/ublkb" in m or "/run/user/6000" in m]
    assert not left, left
    assert not os.path.exists(a_sock)
