"""Runtime files (ublkshell/files.py): root writes only where the tool made and
checked the directory itself, never through a symlink or into a file another
user prepared. Each case is what a local user who is not root could leave
behind for root to find."""
import os
import stat
import subprocess
import sys

import pytest

from ublkshell import files
from ublkshell.errors import UblkError

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the threat is a non-root user against root")


def cli(*args, env):
    return subprocess.run([sys.executable, "-m", "ublkshell", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **env})


def test_private_dir_is_made_0700_and_checked(tmp_path):
    d = files.private_dir(str(tmp_path / "state"))
    st = os.lstat(d)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 0
    assert files.private_dir(d) == d
    assert files.private_dir(str(tmp_path / "absent"), create=False) is None


@pytest.mark.parametrize("make, why", [
    (lambda p: os.symlink("/etc", p), "it is a symlink"),
    (lambda p: (os.mkdir(p), os.chown(p, NOBODY, NOBODY)), f"owned by uid {NOBODY}, not 0"),
    (lambda p: (os.mkdir(p), os.chmod(p, 0o755)), "mode 0755, not 0700"),
    (lambda p: (os.mkdir(p), os.chmod(p, 0o1777)), "mode 1777, not 0700"),
    (lambda p: open(p, "w").close(), "not a directory"),
])
def test_a_directory_someone_else_prepared_is_refused(tmp_path, make, why):
    p = str(tmp_path / "state")
    make(p)
    with pytest.raises(UblkError) as e:
        files.private_dir(p)
    assert str(e.value) == (f"{p}: {why}: refusing to use it for ublkshell's runtime files "
                            "(remove it, or point UBLKSHELL_STATE_DIR / UBLKSHELL_DATA_DIR elsewhere)")


def test_a_parent_others_may_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # world-writable, not sticky: another user could swap our directory
    with pytest.raises(UblkError, match="others may write to it"):
        files.private_dir(str(shared / "state"))
    os.chmod(shared, 0o1777)  # sticky, like /tmp: others cannot rename or remove what we make
    assert files.private_dir(str(shared / "state"))


def test_create_new_replaces_a_planted_symlink_and_never_follows_it(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's file\n")
    d = files.private_dir(str(tmp_path / "data"))
    link = os.path.join(d, "ublkb0.mem")
    os.symlink(victim, link)
    fd = files.create_new(link)
    os.write(fd, b"device data")
    os.close(fd)
    assert victim.read_bytes() == b"root's file\n"
    assert not os.path.islink(link) and open(link, "rb").read() == b"device data"
    os.symlink(victim, link + "2")
    with pytest.raises(UblkError, match="is a symlink: refusing to follow it"):
        files.open_nofollow(link + "2", os.O_RDWR)


def test_write_atomic_leaves_no_temporary_files(tmp_path):
    d = files.private_dir(str(tmp_path / "d"))
    target = os.path.join(d, "x.json")
    files.write_atomic(target, b"1")
    files.write_atomic(target, b"2")
    assert os.listdir(d) == ["x.json"] and open(target, "rb").read() == b"2"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600


def test_data_dir_on_a_disk_state_dir_is_private_and_unguessable(tmp_path, monkeypatch):
    # a state dir on a disk: mem data and statistics go to tmpfs, in a directory made with
    # mkdtemp (nobody can create it first) and named in the state dir (nobody can redirect it)
    monkeypatch.delenv("UBLKSHELL_DATA_DIR", raising=False)
    monkeypatch.setenv("UBLKSHELL_STATE_DIR", str(tmp_path / "state"))
    if files.on_tmpfs(str(tmp_path)):
        pytest.skip("the test's directory is on tmpfs: the data dir would be STATE/data")
    d = files.data_dir()
    try:
        assert os.path.dirname(d) == "/dev/shm" and os.path.basename(d).startswith("ublkshell-")
        assert files.on_tmpfs(d) and stat.S_IMODE(os.lstat(d).st_mode) == 0o700
        assert files.data_dir() == d  # the same one every time
        # a pointer that names somewhere else is refused, not followed
        files.write_atomic(str(tmp_path / "state" / "data-dir"), b"/etc\n")
        with pytest.raises(UblkError, match="names '/etc', not a directory of ours under /dev/shm"):
            files.data_dir()
    finally:
        os.rmdir(d)


def test_data_dir_on_tmpfs_state_dir(monkeypatch):
    monkeypatch.delenv("UBLKSHELL_DATA_DIR", raising=False)
    root = files.private_dir("/dev/shm/ublkshell-test-" + str(os.getpid()))
    try:
        monkeypatch.setenv("UBLKSHELL_STATE_DIR", os.path.join(root, "state"))
        assert files.data_dir() == os.path.join(root, "state", "data")
    finally:
        subprocess.run(["rm", "-rf", root], check=True)


def test_a_user_prepared_data_dir_makes_add_refuse_and_touches_nothing(tmp_path):
    """The reported attack: a user creates the data directory first and plants
    `fuse0.mem -> a file of root's`; root's `add` must neither truncate nor fill it."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's file\n")
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, NOBODY, NOBODY)
    os.chmod(data, 0o700)
    os.symlink(victim, data / "fuse0.mem")
    p = cli("add", "--transport", "fuse", "-t", "mem", "--size", "16M",
            env={"UBLKSHELL_STATE_DIR": str(tmp_path / "state"), "UBLKSHELL_DATA_DIR": str(data)})
    assert p.returncode == 1
    assert p.stderr.strip().startswith(f"ublkshell: {data}: owned by uid {NOBODY}, not 0: refusing to use it")
    assert victim.read_bytes() == b"root's file\n"
    devices = tmp_path / "state" / "devices"
    assert not devices.exists() or os.listdir(devices) == []


def test_state_dir_symlink_is_refused_by_every_command(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    link = tmp_path / "state"
    os.symlink(elsewhere, link)
    for args in (["add", "--transport", "fuse", "-t", "mem", "--size", "16M"], ["serve", "--no-fuse"]):
        p = cli(*args, env={"UBLKSHELL_STATE_DIR": str(link), "UBLKSHELL_DATA_DIR": str(tmp_path / "data")})
        assert p.returncode == 1, (args, p.stderr)
        assert p.stderr.startswith(f"ublkshell: {link}: it is a symlink: refusing to use it"), p.stderr
    assert os.listdir(elsewhere) == []
