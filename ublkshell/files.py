"""Where the tool's runtime files live, and the only ways it opens them.

The tool runs as root next to users who are not: every file it writes at run
time lives in a directory it created itself and checked (a directory, not a
symlink, owned by us, mode 0700), so nobody else can plant a symlink or a file
where root is about to write. Inside those directories every open refuses
symlinks (O_NOFOLLOW), new files are created exclusively (O_EXCL), and files
that others read are replaced whole (a private temporary file, then rename).

    state dir  /run/ublkshell (UBLKSHELL_STATE_DIR): the socket, devices/, log/, fuse/;
               a user who is not root has their own (default_state_dir), same checks
    data dir   mem targets' data and every device's statistics: on tmpfs, so
               they outlive a killed daemon and cost no disk. STATE/data when the
               state dir is on tmpfs (as /run usually is); otherwise a directory
               made with an unguessable name under /dev/shm, named in STATE/data-dir.
               UBLKSHELL_DATA_DIR overrides.
"""
import errno
import fcntl
import os
import stat

from .errors import UblkError

SHM_ROOT = "/dev/shm"
DATA_PREFIX = "ublkshell-"


ROOT_STATE_DIR = "/run/ublkshell"


def default_state_dir() -> str:
    """Where this user's ublkshell keeps its runtime files when UBLKSHELL_STATE_DIR is unset.

    root: /run/ublkshell. Anyone else runs their own server with their own devices
    (docs/security.md, "Unprivileged devices"): $XDG_RUNTIME_DIR/ublkshell when the session
    has one, else /run/user/UID/ublkshell, else /tmp/ublkshell-UID. Whichever it is gets the
    same checks as root's (private_dir): owned by this user, 0700, never a symlink; a name
    another user made first is refused, not used."""
    env = os.environ.get("UBLKSHELL_STATE_DIR")
    if env:
        return env
    uid = os.geteuid()
    if uid == 0:
        return ROOT_STATE_DIR
    for base in (os.environ.get("XDG_RUNTIME_DIR", ""), f"/run/user/{uid}"):
        # the spec: a runtime dir is the user's own, 0700; anything else is not one
        if os.path.isabs(base) and _owned_private(base):
            return os.path.join(base, "ublkshell")
    return f"/tmp/ublkshell-{uid}"


def _owned_private(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def state_dir(create: bool = True):
    return private_dir(default_state_dir(), create)


def default_socket() -> str:
    return os.environ.get("UBLKSHELL_SOCKET") or os.path.join(default_state_dir(), "ublkshell.sock")


def sub_dir(name: str, create: bool = True):
    """STATE/name (devices, log, fuse), None if it does not exist and create is False."""
    top = state_dir(create)
    return None if top is None else private_dir(os.path.join(top, name), create)


def _refuse(path: str, why: str) -> UblkError:
    return UblkError(f"{path}: {why}: refusing to use it for ublkshell's runtime files "
                     "(remove it, or point UBLKSHELL_STATE_DIR / UBLKSHELL_DATA_DIR elsewhere)")


def _check_parent(path: str) -> None:
    # a parent others may write to (and not sticky) lets them swap our directory for theirs
    parent = os.path.dirname(os.path.abspath(path)) or "/"
    st = os.stat(parent)
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise _refuse(parent, "others may write to it")
    if st.st_uid not in (0, os.geteuid()):
        raise _refuse(parent, f"owned by uid {st.st_uid}")


def private_dir(path: str, create: bool = True):
    """path, once it is a real directory owned by us with mode 0700; created so if missing.
    None if missing and create is False; a one-line UblkError naming the path otherwise."""
    path = os.path.abspath(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            return None
        _check_parent(path)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass  # made by a concurrent call: checked below like any other
        except PermissionError:
            raise UblkError(f"{path}: cannot create it: permission denied "
                            "(point UBLKSHELL_STATE_DIR at a directory of yours)") from None
        except OSError as e:
            raise UblkError(f"{path}: cannot create it: {e.strerror}") from None
        st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(path, "it is a symlink")
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "not a directory")
    if st.st_uid != os.geteuid():
        raise _refuse(path, f"owned by uid {st.st_uid}, not {os.geteuid()}")
    if st.st_mode & 0o077:
        raise _refuse(path, f"mode {stat.S_IMODE(st.st_mode):04o}, not 0700")
    return path


def on_tmpfs(path: str) -> bool:
    """Whether path's data lives in memory (tmpfs, ramfs)."""
    from ._native import lib

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return bool(lib.us_fd_in_memory(fd))
    finally:
        os.close(fd)


def data_dir(create: bool = True):
    """Where mem data and statistics live (see the module's notes); None if not made yet."""
    env = os.environ.get("UBLKSHELL_DATA_DIR")
    if env:
        return private_dir(env, create)
    top = state_dir(create)
    if top is None:
        return None
    if on_tmpfs(top):
        return private_dir(os.path.join(top, "data"), create)
    pointer = os.path.join(top, "data-dir")
    found = _read_data_pointer(pointer)
    if found or not create:
        return found
    with locked(os.path.join(top, ".data-dir.lock")):
        found = _read_data_pointer(pointer)
        if found is None:
            # mkdtemp: an unguessable name, created with O_EXCL semantics and mode 0700,
            # so nobody can have made it first in the world-writable /dev/shm
            import tempfile

            found = tempfile.mkdtemp(prefix=DATA_PREFIX, dir=SHM_ROOT)
            write_atomic(pointer, found.encode() + b"\n")
    return private_dir(found, create=False)


def _read_data_pointer(pointer: str):
    try:
        with os.fdopen(open_nofollow(pointer, os.O_RDONLY), "rb") as f:
            path = f.read(4096).decode(errors="replace").strip()
    except FileNotFoundError:
        return None
    if os.path.dirname(path) != SHM_ROOT or not os.path.basename(path).startswith(DATA_PREFIX):
        raise _refuse(pointer, f"it names {path[:80]!r}, not a directory of ours under {SHM_ROOT}")
    # gone (a reboot emptied /dev/shm): a new one is made
    return private_dir(path, create=False)


def open_nofollow(path: str, flags: int, mode: int = 0o600) -> int:
    """os.open that refuses a symlink in the last component (one-line error)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UblkError(f"{path}: is a symlink: refusing to follow it") from None
        raise


def create_new(path: str, flags: int = os.O_RDWR, mode: int = 0o600) -> int:
    """A new, empty file at path (whatever was there, a file or a symlink, is removed first,
    never followed); a file someone else creates in between is an error, not ours to use."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise UblkError(f"{path}: is a directory") from None
    try:
        return open_nofollow(path, flags | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise UblkError(f"{path}: appeared while it was being created: refusing to use it") from None


def make_temp(path: str) -> tuple[int, str]:
    """A private temporary file beside path (same directory, O_EXCL, unguessable name),
    to be filled and then renamed over path."""
    d, base = os.path.split(path)
    import tempfile

    return tempfile.mkstemp(dir=d, prefix=f".{base}.", suffix=".tmp")


def write_atomic(path: str, data: bytes) -> None:
    """Replace path whole: readers see the old content or the new, never a part."""
    fd, tmp = make_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        unlink_quiet(tmp)
        raise


def unlink_quiet(path) -> None:
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class locked:
    """An exclusive flock on a lock file of ours, held for a `with` block."""

    def __init__(self, path: str):
        self.path = path
        self.fd = -1

    def __enter__(self) -> int:
        self.fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self.fd

    def __exit__(self, *exc) -> None:
        os.close(self.fd)
        self.fd = -1
