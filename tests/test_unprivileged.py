"""Users who are not root (docs/security.md, "Unprivileged devices"), on the host:
where a user's runtime files go and what another user can plant there first, how
control commands carry /dev/ublkcN for the kernel's permission check (a fake
kernel: only the encoding is under test here; tests/vm/test_unprivileged.py has
the real driver), the udev verb's checks, and the refusals."""
import errno
import os
import subprocess
import sys

import pytest

from ublkshell import files, procs
from ublkshell._native import ffi, lib
from ublkshell.devices import udev, unprivileged
from ublkshell.errors import UblkError, UsageError
from ublkshell.kernel import ctrl as ctrlmod

USER = 60001
OTHER = 60002


@pytest.fixture
def as_user(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: USER)
    monkeypatch.delenv("UBLKSHELL_STATE_DIR", raising=False)
    monkeypatch.delenv("UBLKSHELL_SOCKET", raising=False)
    return monkeypatch


# -- where a user's files go --------------------------------------------------
def test_root_keeps_run_ublkshell(monkeypatch):
    monkeypatch.delenv("UBLKSHELL_STATE_DIR", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert files.default_state_dir() == "/run/ublkshell"


def _runtime_dir(tmp_path, uid=USER, mode=0o700):
    d = tmp_path / f"run-{uid}"
    d.mkdir()
    os.chmod(d, mode)
    os.chown(d, uid, uid)
    return str(d)


@pytest.mark.skipif(os.geteuid() != 0, reason="makes directories owned by other users")
def test_user_state_dir_is_in_their_runtime_dir(tmp_path, as_user):
    rt = _runtime_dir(tmp_path)
    as_user.setenv("XDG_RUNTIME_DIR", rt)
    assert files.default_state_dir() == os.path.join(rt, "ublkshell")
    assert files.default_socket() == os.path.join(rt, "ublkshell", "ublkshell.sock")


@pytest.mark.skipif(os.geteuid() != 0, reason="makes directories owned by other users")
@pytest.mark.parametrize("uid, mode", [(OTHER, 0o700), (USER, 0o755)])
def test_a_runtime_dir_not_private_to_the_user_is_not_used(tmp_path, as_user, uid, mode):
    as_user.setenv("XDG_RUNTIME_DIR", _runtime_dir(tmp_path, uid, mode))
    assert files.default_state_dir() in (f"/run/user/{USER}/ublkshell", f"/tmp/ublkshell-{USER}")


def test_a_symlinked_or_relative_runtime_dir_is_not_used(tmp_path, as_user):
    os.symlink("/etc", tmp_path / "link")
    for bad in (str(tmp_path / "link"), "relative/dir", ""):
        as_user.setenv("XDG_RUNTIME_DIR", bad)
        assert files.default_state_dir() in (f"/run/user/{USER}/ublkshell", f"/tmp/ublkshell-{USER}")


@pytest.mark.skipif(os.geteuid() != 0, reason="plants a directory as another user")
@pytest.mark.parametrize("plant", ["dir", "symlink"])
def test_a_state_dir_another_user_made_first_is_refused(tmp_path, as_user, plant):
    """/tmp/ublkshell-UID is a name anyone can take first: it is refused, never used."""
    p = tmp_path / "ublkshell-60001"
    if plant == "dir":
        p.mkdir(mode=0o700)
        os.chown(p, OTHER, OTHER)
    else:
        os.symlink(str(tmp_path), p)
    as_user.setenv("UBLKSHELL_STATE_DIR", str(p))
    with pytest.raises(UblkError) as e:
        files.state_dir()
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_users_default_mount_is_inside_their_state_dir(tmp_path, as_user, monkeypatch):
    from ublkshell.bridge.server import DEFAULT_MOUNT, default_mount

    monkeypatch.setattr(files, "state_dir", lambda create=True: str(tmp_path))
    assert default_mount() == str(tmp_path / "stats")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_mount() == DEFAULT_MOUNT


# -- control commands carry the char device path --------------------------------
class FakeKernel:
    """Decodes what us_ctrl_cmd is given as the driver would; answers GET_DEV_INFO2 with
    the flags of the device it was told about."""

    def __init__(self, unpriv_ids, features):
        self.unpriv_ids = set(unpriv_ids)
        self.features = features
        self.calls = []

    def __getattr__(self, name):
        return getattr(lib, name)

    def us_ctrl_cmd(self, fd, op, cmd):
        nr = op & 0xFF
        n = int(cmd.dev_path_len)
        raw = ffi.buffer(ffi.cast("char *", cmd.addr), cmd.len)[:] if cmd.addr else b""
        path, payload = raw[:n].decode(), raw[n:]
        self.calls.append((nr, int(cmd.dev_id), path, len(payload)))
        if op == lib.UBLK_U_CMD_GET_FEATURES:
            ffi.cast("uint64_t *", cmd.addr)[0] = self.features
            return 0
        dev = int(cmd.dev_id)
        unpriv = dev in self.unpriv_ids
        if (unpriv or nr == lib.UBLK_CMD_GET_DEV_INFO2) and path != f"/dev/ublkc{dev}":
            return -errno.EINVAL
        if nr in (lib.UBLK_CMD_GET_DEV_INFO2, lib.UBLK_CMD_GET_DEV_INFO):
            info = ffi.cast("struct ublksrv_ctrl_dev_info *", cmd.addr + n)
            info.dev_id = dev
            info.flags = lib.UBLK_F_UNPRIVILEGED_DEV if unpriv else 0
        if nr == lib.UBLK_CMD_GET_PARAMS:
            p = ffi.cast("struct ublk_params *", cmd.addr + n)
            assert p.len == ffi.sizeof("struct ublk_params"), "the payload must follow the path intact"
            p.basic.dev_sectors = 2048
        return 0


@pytest.fixture
def fake(monkeypatch):
    k = FakeKernel({5}, lib.UBLK_F_UNPRIVILEGED_DEV | lib.UBLK_F_CMD_IOCTL_ENCODE)
    monkeypatch.setattr(ctrlmod, "lib", k)
    return k


def test_commands_on_an_unprivileged_device_carry_its_path(fake):
    with ctrlmod.Control("/dev/null") as c:
        assert c.get_params(5).basic.dev_sectors == 2048
        c.stop_dev(5)
        c.del_dev(5)
    nrs = [(nr, path) for nr, dev, path, _ in fake.calls if dev == 5]
    # GET_DEV_INFO first (refused without the path), then GET_DEV_INFO2 with it
    assert nrs == [(lib.UBLK_CMD_GET_DEV_INFO, ""), (lib.UBLK_CMD_GET_DEV_INFO2, "/dev/ublkc5"),
                   (lib.UBLK_CMD_GET_PARAMS, "/dev/ublkc5"),
                   (lib.UBLK_CMD_STOP_DEV, "/dev/ublkc5"), (lib.UBLK_CMD_DEL_DEV, "/dev/ublkc5")]
    # the payload after the path is the command's own, whole
    assert [size for nr, dev, _, size in fake.calls if nr == lib.UBLK_CMD_GET_PARAMS] == [
        ffi.sizeof("struct ublk_params")]


def test_commands_on_a_privileged_device_carry_none(fake):
    with ctrlmod.Control("/dev/null") as c:
        c.get_params(2)
        c.del_dev(2)
    paths = [(nr, path) for nr, dev, path, _ in fake.calls if dev == 2]
    # a root device answers GET_DEV_INFO (no node needed) and its commands carry no path
    assert paths == [(lib.UBLK_CMD_GET_DEV_INFO, ""), (lib.UBLK_CMD_GET_PARAMS, ""),
                     (lib.UBLK_CMD_DEL_DEV, "")]


def test_root_keeps_a_device_whose_node_is_missing(monkeypatch):
    """/dev/ublkcN gone (a static /dev, an rm): root's GET_DEV_INFO needs no node, so the
    device is neither hidden from list nor taken for deleted."""
    k = FakeKernel(set(), lib.UBLK_F_UNPRIVILEGED_DEV | lib.UBLK_F_CMD_IOCTL_ENCODE)
    real = k.us_ctrl_cmd

    def no_node(fd, op, cmd):
        if cmd.dev_path_len:
            return -errno.ENOENT
        return real(fd, op, cmd)

    k.us_ctrl_cmd = no_node
    monkeypatch.setattr(ctrlmod, "lib", k)
    with ctrlmod.Control("/dev/null") as c:
        assert c.get_dev_info(3).dev_id == 3


def test_a_kernel_without_unprivileged_devices_gets_no_path(monkeypatch):
    k = FakeKernel(set(), lib.UBLK_F_CMD_IOCTL_ENCODE)
    monkeypatch.setattr(ctrlmod, "lib", k)
    with ctrlmod.Control("/dev/null") as c:
        c.get_dev_info(1)
        c.del_dev(1)
    assert [(nr, path) for nr, dev, path, _ in k.calls if dev == 1] == [
        (lib.UBLK_CMD_GET_DEV_INFO, ""), (lib.UBLK_CMD_DEL_DEV, "")]


def test_add_dev_remembers_the_device_is_unprivileged(fake):
    real_cmd = fake.us_ctrl_cmd

    def add(fd, op, cmd):
        if op & 0xFF == lib.UBLK_CMD_ADD_DEV:
            info = ffi.cast("struct ublksrv_ctrl_dev_info *", cmd.addr)
            assert info.flags & lib.UBLK_F_UNPRIVILEGED_DEV and not cmd.dev_path_len
            info.dev_id = 5
            return 0
        return real_cmd(fd, op, cmd)

    fake.us_ctrl_cmd = add
    with ctrlmod.Control("/dev/null") as c:
        c.add_dev(-1, 1, 4, 1 << 19, lib.UBLK_F_UNPRIVILEGED_DEV)
        c.start_dev(5, 1)
    # no GET_DEV_INFO2 in between: ADD_DEV's answer said so
    assert [(nr, path) for nr, dev, path, _ in fake.calls if dev == 5] == [
        (lib.UBLK_CMD_START_DEV, "/dev/ublkc5")]


def test_someone_elses_device_is_one_line(as_user):
    e = ctrlmod.CtrlError("DEL_DEV", 3, errno.EACCES)
    assert "/dev/ublkc3 is not yours" in str(e)
    e = ctrlmod.CtrlError("GET_DEV_INFO2", 3, errno.EPERM)
    assert "not yours" in str(e) and "\n" not in str(e)


def test_no_access_to_the_control_device_names_the_fix(monkeypatch):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(UblkError) as e:
        ctrlmod.Control("/dev/ublk-control")
    assert "/dev/ublk-control: permission denied" in str(e.value)
    assert "docs/security.md" in str(e.value) and "\n" not in str(e.value)


# -- refusals -------------------------------------------------------------------
@pytest.mark.parametrize("spec, words", [
    ({"recovery": "requeue"}, "--recovery"),
    ({"zero_copy": "on"}, "--zero-copy on"),
    ({"zero_copy": "fallback"}, "--zero-copy fallback"),
])
def test_a_user_is_refused_what_the_kernel_would_refuse(as_user, spec, words):
    with pytest.raises(UsageError) as e:
        unprivileged.check_spec({"target": "mem", **spec})
    assert words in str(e.value) and "not root" in str(e.value)


def test_a_users_add_flags(as_user):
    zc = lib.UBLK_F_AUTO_BUF_REG | lib.UBLK_F_USER_COPY | lib.UBLK_F_SUPPORT_ZERO_COPY
    flags = unprivileged.add_flags(zc | lib.UBLK_F_CMD_IOCTL_ENCODE)
    assert flags == lib.UBLK_F_UNPRIVILEGED_DEV | lib.UBLK_F_CMD_IOCTL_ENCODE
    unprivileged.check_spec({"target": "mem", "zero_copy": "auto"})  # auto means off


def test_root_is_not_limited(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    unprivileged.check_spec({"target": "mem", "recovery": "requeue", "zero_copy": "on"})
    assert unprivileged.add_flags(lib.UBLK_F_USER_COPY) == lib.UBLK_F_USER_COPY


def test_waiting_for_udev_is_bounded_and_names_the_rule(monkeypatch, tmp_path):
    with pytest.raises(UblkError, match="did not appear"):
        unprivileged.wait_for_node(str(tmp_path / "ublkc9"), timeout=0.1)

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(UblkError) as e:
        unprivileged.wait_for_node("/dev/ublkc9", timeout=0.1)
    assert "udev" in str(e.value) and "udev-rules" in str(e.value) and "\n" not in str(e.value)


def test_waiting_refuses_a_symlink(tmp_path):
    os.symlink("/dev/null", tmp_path / "ublkc9")
    with pytest.raises(UblkError):
        unprivileged.wait_for_node(str(tmp_path / "ublkc9"), timeout=0.1)


# -- the udev verb ----------------------------------------------------------------
@pytest.mark.parametrize("name, want", [("ublkc0", ("c", 0)), ("ublkb17", ("b", 17)),
                                        ("ublkc1048575", ("c", 1048575))])
def test_udev_names(name, want):
    assert udev.parse_name(name) == want


@pytest.mark.parametrize("name", [
    "", "ublkc", "ublkc01", "ublkc-1", "ublkc1048576", "ublkc99999999", "ublkd3", "ublkc3/../../etc/passwd",
    "../ublkc3", "ublkc3 ", " ublkc3", "ublkc\u0663", "ublkc3\n", "ublkc3\x00", "UBLKC3", "ublk-control",
    "ublkc" + "9" * 100000, b"ublkc\xff".decode(errors="surrogateescape"),
])
def test_udev_refuses_anything_but_a_ublk_node_name(name):
    with pytest.raises(UsageError) as e:
        udev.parse_name(name)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 200 and msg.isascii()


def _udev(*args, user=None):
    pre = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user else []
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(files.__file__)))}
    return subprocess.run(pre + [sys.executable, "-P", "-m", "ublkshell", *args], capture_output=True,
                          timeout=60, env=env, cwd="/")


def test_udev_verb_bad_input_is_one_line():
    for args, rc in [(["udev"], 2), (["udev", "add"], 2), (["udev", "chown", "ublkc0"], 2),
                     (["udev", "add", "ublkc0", "extra"], 2), (["udev", "add", b"ublkc\xff".decode(
                         errors="surrogateescape")], 2), (["udev", "add", "x" * 100000], 2),
                     (["udev-rules", "--group", "bad group"], 2)]:
        p = _udev(*args)
        lines = p.stderr.decode(errors="replace").strip().splitlines()
        assert p.returncode == rc and len(lines) == 1 and lines[0].startswith("ublkshell: udev"), (args, p)


def test_udev_remove_and_a_missing_node_are_quiet():
    assert _udev("udev", "remove", "ublkc4").returncode == 0
    p = _udev("udev", "add", "ublkc1048000")
    assert p.returncode == 0 and b"gone" in p.stderr


def test_udev_verb_refuses_a_node_that_is_not_a_device(monkeypatch, tmp_path):
    """A regular file (or a symlink) where the node should be is never chowned."""
    real_open = os.open
    target = tmp_path / "victim"
    target.write_bytes(b"")
    os.symlink(target, tmp_path / "link")
    for planted in (str(target), str(tmp_path / "link")):
        monkeypatch.setattr(os, "open", lambda p, *a, planted=planted, **k: real_open(planted, *a, **k))
        try:
            udev.hand_over("c", 3)
        except UblkError as e:
            assert "left alone" in str(e) or "symbolic" in str(e) or "Too many" in str(e) or "link" in str(e)
        st = os.stat(target)
        assert (st.st_uid, st.st_mode & 0o777) == (os.getuid(), target.stat().st_mode & 0o777)


def test_udev_verb_only_for_root():
    if os.geteuid() != 0:
        pytest.skip("needs root to run it as another user")
    p = _udev("udev", "add", "ublkc0", user=USER)
    if b"Permission denied" in p.stderr and b"python" in p.stderr:
        pytest.skip("this interpreter is not readable by other users")
    assert p.returncode == 1 and p.stderr.strip() == (
        b"ublkshell: udev: only root hands devices to their owners (udev runs this)"), p


def test_rules_name_the_group_and_our_verb():
    text = udev.rules("/usr/local/bin/ublkshell", group="disk")
    assert 'KERNEL=="ublk-control", GROUP="disk", MODE="0660"' in text
    assert 'RUN+="/usr/local/bin/ublkshell udev add %k"' in text
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "udev", udev.RULES_FILE)) as f:
        assert f.read() == udev.rules("/usr/local/bin/ublkshell")


def test_rules_refuse_an_interpreter_udev_cannot_run(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/opt/my python/bin/python3")
    with pytest.raises(UblkError, match="spaces"):
        udev.rules()


def test_rules_use_this_interpreter():
    p = _udev("udev-rules")
    assert p.returncode == 0 and f"{sys.executable} -I -m ublkshell udev add %k".encode() in p.stdout


def test_rules_refuse_an_interpreter_a_user_could_change(monkeypatch, tmp_path):
    """udev runs the rule's program as root: never one in a directory a user owns."""
    d = tmp_path / "venv" / "bin"
    d.mkdir(parents=True)
    exe = d / "python3"
    exe.write_text("")
    os.chown(tmp_path / "venv", 60001, 60001)
    monkeypatch.setattr(sys, "executable", str(exe))
    with pytest.raises(UblkError, match=r"venv is not root's alone \(owner uid 60001"):
        udev.rules()


def test_a_user_on_a_kernel_without_unprivileged_devices_is_one_line(as_user):
    with pytest.raises(UblkError, match="UBLK_F_UNPRIVILEGED_DEV"):
        unprivileged.check_kernel(lib.UBLK_F_USER_COPY)
    unprivileged.check_kernel(lib.UBLK_F_UNPRIVILEGED_DEV)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as two other users")
def test_a_state_dir_planted_by_another_user_stops_the_server_in_one_line():
    """B makes /tmp/ublkshell-A first (A has no runtime dir): A's server refuses it."""
    a, b = 60007, 60008
    planted = f"/tmp/ublkshell-{a}"
    if os.path.exists(f"/run/user/{a}") or os.path.lexists(planted):
        pytest.skip(f"{planted} or /run/user/{a} exists already")
    os.mkdir(planted, 0o700)
    os.chown(planted, b, b)
    try:
        env = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(files.__file__)))}
        p = subprocess.run(["setpriv", f"--reuid={a}", f"--regid={a}", "--clear-groups", sys.executable, "-P",
                            "-m", "ublkshell", "serve", "--no-fuse"], capture_output=True, text=True,
                           timeout=60, env=env, cwd="/")
        if "Permission denied" in p.stderr and "python" in p.stderr:
            pytest.skip("this interpreter is not readable by other users")
        assert p.returncode == 1, p
        assert p.stderr.strip() == (f"ublkshell: {planted}: owned by uid {b}, not {a}: refusing to use it for "
                                    "ublkshell's runtime files (remove it, or point UBLKSHELL_STATE_DIR / "
                                    "UBLKSHELL_DATA_DIR elsewhere)"), p
        assert os.listdir(planted) == []
    finally:
        os.rmdir(planted)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as two other users")
def test_a_users_server_socket_is_theirs_only(tmp_path):
    """A's own server listens in A's runtime dir, 0600; B cannot connect to it."""
    import signal
    import tempfile
    import time

    a, b = 60007, 60008
    top = tempfile.mkdtemp(prefix="ublkshell-users-")
    os.chmod(top, 0o711)
    rt = os.path.join(top, "a")
    os.mkdir(rt, 0o700)
    os.chown(rt, a, a)
    env = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "XDG_RUNTIME_DIR": rt,
           "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(files.__file__)))}
    as_ = lambda uid: ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable, "-P"]  # noqa: E731
    server = subprocess.Popen(as_(a) + ["-m", "ublkshell", "serve", "--no-fuse"], env=env, cwd="/",
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sock = os.path.join(rt, "ublkshell", "ublkshell.sock")
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock) and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if server.poll() is not None and "python" in server.stderr.read():
            pytest.skip("this interpreter is not readable by other users")
        st, dst = os.lstat(sock), os.lstat(os.path.dirname(sock))
        assert (st.st_uid, st.st_mode & 0o777, dst.st_uid, dst.st_mode & 0o777) == (a, 0o600, a, 0o700)
        probe = ("import sys; from ublkshell.bridge.client import Client\n"
                 "try:\n    Client(sys.argv[1], timeout=5).call('list')\nexcept Exception as e:\n"
                 "    print(type(e).__name__, e)\nelse:\n    print('connected')")
        p = subprocess.run(as_(b) + ["-c", probe, sock], capture_output=True, text=True, timeout=60, env=env,
                           cwd="/")
        assert "connected" not in p.stdout and "ermission denied" in p.stdout, p
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        subprocess.run(["rm", "-rf", top])
    assert not os.path.exists(sock)


def test_the_pid_an_unprivileged_device_names_is_believed_only_for_its_owner():
    """START_DEV takes the pid from its caller: a user could name another user's daemon
    for root's `del` to signal. Only a process running as the owner is believed."""
    from types import SimpleNamespace

    me, unpriv = os.getpid(), lib.UBLK_F_UNPRIVILEGED_DEV
    own = SimpleNamespace(ublksrv_pid=me, flags=unpriv, owner_uid=os.getuid())
    assert unprivileged.believed_pid(own) == (me, procs.start_time(me))
    foreign = SimpleNamespace(ublksrv_pid=me, flags=unpriv, owner_uid=OTHER)
    assert unprivileged.believed_pid(foreign) == (-1, None)
    for bad in (0, -5, 1 << 40):
        assert unprivileged.believed_pid(SimpleNamespace(ublksrv_pid=bad, flags=unpriv, owner_uid=0)) == (-1, None)
    # root's own devices: the kernel's pid, checked as before (one of our daemons, or no signal)
    assert unprivileged.believed_pid(SimpleNamespace(ublksrv_pid=me, flags=0, owner_uid=OTHER)) == (me, None)
