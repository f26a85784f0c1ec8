"""The files a command writes where its user said (`record -o`), made the safe way for a
process that runs as root beside users who are not.

The directory is opened once, as it is when the command starts, and everything after
happens relative to that descriptor: swapping the directory (or a parent) for a symlink
later changes nothing. The files are written as unnamed files in that directory
(O_TMPFILE, mode 0600) and given their names only when the command ends well: a failure
or a kill, even SIGKILL, leaves nothing behind and replaces nothing. Where the filesystem
has no O_TMPFILE, private temporary names (O_EXCL, O_NOFOLLOW) stand in, and those a
killed run left are removed by the next run that writes the same names. In place means a new name (link, which
fails rather than replace something that appeared meanwhile) or, with force, a rename
over a file or symlink (never followed); a directory, a device node or a pipe is never
replaced.
"""
import errno
import os
import secrets
import stat

from ..errors import UblkError, UsageError


class Outputs:
    def __init__(self, paths: list[str], force: bool, binary: bool, stale: list[str] = (), what="record"):
        """paths: the files to make, all in one directory; stale: more of its files that must
        go when these are put in place (another run's leftovers), refused like paths."""
        self.what, self.force = what, force
        d = os.path.dirname(os.path.abspath(paths[0]))
        try:
            self.dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise UblkError(f"{what}: {d}: {e.strerror}") from None
        self.dir = d
        self.names = [os.path.basename(p) for p in paths]
        self.stale = [os.path.basename(p) for p in stale]
        self.temps: list[str] = []
        self.files: list = []
        try:
            for name in self.names + self.stale:
                self._refuse(name)
            for name in self.names:
                self._remove_dead_temps(name)
                fd = self._unnamed()
                if fd is None:
                    tmp = _temp_name(name)
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                                 dir_fd=self.dfd)
                else:
                    tmp = None
                self.temps.append(tmp)
                self.files.append(os.fdopen(fd, "wb" if binary else "w"))
        except OSError as e:
            self.discard()
            raise UblkError(f"{what}: {os.path.join(d, name)}: {e.strerror}") from None
        except BaseException:
            self.discard()
            raise

    def _unnamed(self):
        try:
            return os.open(".", os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o600, dir_fd=self.dfd)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                return None  # this filesystem has no unnamed files: named temporaries it is
            raise

    def _remove_dead_temps(self, name: str) -> None:
        """A killed run's temporaries of this name: ours (same owner), regular, writer gone."""
        prefix = f".{name}."
        for entry in os.listdir(self.dfd):
            pid = _temp_pid(entry, prefix)
            if pid is None or _alive(pid):
                continue
            try:
                st = os.lstat(entry, dir_fd=self.dfd)
                if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                    os.unlink(entry, dir_fd=self.dfd)
            except OSError:
                pass

    def _name(self, f, tmp, name: str, replace: bool) -> str | None:
        """Give the written file the name; returns the temporary name it stays under when
        name appeared meanwhile (and replace is off)."""
        if tmp is None:
            # an unnamed file: link it from its descriptor, under a temporary name first
            # when it is to replace something (link never replaces)
            tmp = _temp_name(name)
            target = tmp if replace else name
            try:
                os.link(f"/proc/self/fd/{f.fileno()}", target, dst_dir_fd=self.dfd, follow_symlinks=True)
            except FileExistsError:
                kept = _kept_name(name)
                os.link(f"/proc/self/fd/{f.fileno()}", kept, dst_dir_fd=self.dfd, follow_symlinks=True)
                return kept
            if not replace:
                return None
        if replace:
            os.rename(tmp, name, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
            return None
        try:
            os.link(tmp, name, src_dir_fd=self.dfd, dst_dir_fd=self.dfd, follow_symlinks=False)
        except FileExistsError:
            # under a name no later run takes for a dead run's leftovers
            kept = _kept_name(name)
            os.rename(tmp, kept, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
            return kept
        os.unlink(tmp, dir_fd=self.dfd)
        return None

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _refuse(self, name: str) -> None:
        try:
            st = os.lstat(name, dir_fd=self.dfd)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{self.what}: {self.path(name)} is a directory")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise UsageError(f"{self.what}: {self.path(name)} is not a regular file ({self.what} writes files of its own)")
        if not self.force:
            raise UsageError(f"{self.what}: {self.path(name)} exists (--force replaces it)")

    def commit(self) -> None:
        """Put every file in place (they were complete), remove the stale ones."""
        try:
            for f in self.files:
                f.flush()
            for i, (f, tmp, name) in enumerate(zip(self.files, self.temps, self.names)):
                kept = self._name(f, tmp, name, self.force)
                self.temps[i] = None
                if kept:
                    # nothing lost, nothing replaced: the recording stays under its temporary name
                    raise UblkError(f"{self.what}: {self.path(name)} appeared meanwhile (--force replaces "
                                    f"it); what was written is in {self.path(kept)}")
            for f in self.files:
                f.close()
            for name in self.stale:
                try:
                    os.unlink(name, dir_fd=self.dfd)
                except FileNotFoundError:
                    pass
        except OSError as e:
            self.discard()
            raise UblkError(f"{self.what}: writing {self.dir} failed: {e.strerror}") from None
        finally:
            self._close_dir()

    def discard(self) -> None:
        """Remove what was written: nothing of a failed recording stays."""
        for f in self.files:
            try:
                f.close()
            except OSError:
                pass
        for tmp in self.temps:
            if tmp is None:
                continue  # an unnamed file goes with its descriptor
            try:
                os.unlink(tmp, dir_fd=self.dfd)
            except OSError:
                pass
        self.temps = []
        self._close_dir()

    def _close_dir(self) -> None:
        if self.dfd >= 0:
            os.close(self.dfd)
            self.dfd = -1


def _temp_name(name: str) -> str:
    # the writer's pid in the name: the next run knows a dead run's leftovers
    return f".{name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"


def _kept_name(name: str) -> str:
    return f"{name}.kept-{secrets.token_hex(4)}"


def _temp_pid(entry: str, prefix: str) -> int | None:
    if not (entry.startswith(prefix) and entry.endswith(".tmp")):
        return None
    parts = entry[len(prefix):-len(".tmp")].split(".")
    if len(parts) != 2 or not parts[0].isdigit() or not parts[0].isascii():
        return None
    return int(parts[0])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
