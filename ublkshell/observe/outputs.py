"""The files a command writes where its user said (`record -o`), made the safe way for a
process that runs as root beside users who are not.

The directory is opened once, as it is when the command starts, and everything after
happens relative to that descriptor: swapping the directory (or a parent) for a symlink
later changes nothing. The files are written under private temporary names (O_EXCL,
O_NOFOLLOW, mode 0600) and put in place only when the command ends well: a failure or a
kill leaves nothing behind and replaces nothing. In place means a new name (link, which
fails rather than replace something that appeared meanwhile) or, with force, a rename
over a file or symlink (never followed); a directory, a device node or a pipe is never
replaced.
"""
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
                tmp = f".{name}.{secrets.token_hex(6)}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=self.dfd)
                self.temps.append(tmp)
                self.files.append(os.fdopen(fd, "wb" if binary else "w"))
        except OSError as e:
            self.discard()
            raise UblkError(f"{what}: {os.path.join(d, name)}: {e.strerror}") from None
        except BaseException:
            self.discard()
            raise

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
                f.close()
            for tmp, name in zip(self.temps, self.names):
                if self.force:
                    os.rename(tmp, name, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
                else:
                    try:
                        os.link(tmp, name, src_dir_fd=self.dfd, dst_dir_fd=self.dfd, follow_symlinks=False)
                    except FileExistsError:
                        # nothing lost, nothing replaced: the recording stays under its temporary name
                        raise UblkError(f"{self.what}: {self.path(name)} appeared meanwhile (--force replaces "
                                        f"it); what was written is in {self.path(tmp)}") from None
                    os.unlink(tmp, dir_fd=self.dfd)
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
