"""The stats tree's file system operations: pyfuse3 handlers on the server's trio loop.
Nothing is cached: each lookup, readdir and open asks the DeviceSource again, so devices
appear and vanish with the server's view of them. Every handler is guarded: an exception
escaping one would end pyfuse3's loop and leave a dead mount."""
import errno
import logging
import os
import stat
import time
from typing import NamedTuple

import pyfuse3
import trio

from ...devices.ids import from_stem, stem
from ...errors import UblkError
from .guard import guard_handlers
from .trace_file import TraceReader
from .content import (DEV_BY_NAME, DEV_FILES, Q_BY_NAME, Q_FILES, ROOT_BY_NAME, ROOT_FILES, DeviceSource, Gone,
                      apply_fault_line)

log = logging.getLogger(__name__)

# a blocked trace read holds one of pyfuse3's worker tasks (99 at most): keep
# plenty for everything else
MAX_TRACE_READERS = 32
MAX_FAULT_WRITE = 64 * 1024


# -- inode numbers -----------------------------------------------------------
# Derived from the path, so nothing needs remembering between requests and a
# device that comes back under the same id gets the same numbers:
#   (dev_id + 1) << 40 | queue field << 16 | index
# queue field 0 is the device directory level, q + 1 a queue's directory.
DIR_IDX = 0
# the root's own files (metrics) are 2, 3, ...: below every device's numbers, above the root's 1
ROOT_FILE_INO = 2
QUEUES_IDX = 0xFFFF
_SHIFT_DEV, _SHIFT_Q, _MASK_Q, _MASK_IDX = 40, 16, 0xFFFFFF, 0xFFFF


def _ino(dev: int, qf: int = 0, idx: int = DIR_IDX) -> int:
    return ((dev + 1) << _SHIFT_DEV) | (qf << _SHIFT_Q) | idx


def _split(ino: int) -> tuple[int, int, int]:
    return (ino >> _SHIFT_DEV) - 1, (ino >> _SHIFT_Q) & _MASK_Q, ino & _MASK_IDX


class Node(NamedTuple):
    kind: str  # root, devdir, qsdir (queues/), qdir (queues/<q>/), file, qfile
    dev: int | None
    q: int | None
    spec: tuple | None  # the DEV_FILES / Q_FILES row of a file
    entry: dict | None


class _Handle:
    def __init__(self, kind, dev, data=b"", trace=None):
        self.kind, self.dev, self.data, self.trace = kind, dev, data, trace
        self.written = b""  # faults: a line not finished yet


def _err(code):
    return pyfuse3.FUSEError(code)


@guard_handlers
class StatsTree(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, source: DeviceSource):
        super().__init__()
        self.source = source
        self.handles: dict[int, _Handle] = {}
        self.dirs: dict[int, int] = {}
        self._next_fh = 1
        self.mounted_ns = time.time_ns()
        self.fault_errors: dict[int, str] = {}  # the last rejected `faults` line per device

    # -- helpers ---------------------------------------------------------------
    def _fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _devices(self) -> dict:
        try:
            devs = self.source.devices()
        except Exception as e:
            log.error("stats tree: listing devices failed: %s: %s", type(e).__name__, e)
            raise _err(errno.EIO) from None
        return {d: e for d, e in devs.items() if isinstance(d, int) and 0 <= d < (1 << 22)}

    def _shm(self, dev: int):
        s = self.source.shm(dev)
        # a Shm the server closed has no mapping left: treat it as gone
        return s if s is not None and s.base is not None else None

    def _nr_queues(self, entry, s) -> int:
        if s is not None:
            return s.nr_queues
        q = entry.get("queues")
        return q if isinstance(q, int) and 0 <= q < _MASK_Q else 0

    def _node(self, ino: int) -> Node:
        """What a live inode is, else ENOENT."""
        if ino == pyfuse3.ROOT_INODE:
            return Node("root", None, None, None, None)
        if ROOT_FILE_INO <= ino < ROOT_FILE_INO + len(ROOT_FILES):
            return Node("file", None, None, ROOT_FILES[ino - ROOT_FILE_INO], None)
        dev, qf, idx = _split(ino)
        entry = self._devices().get(dev)
        if entry is None:
            raise _err(errno.ENOENT)
        if qf == 0:
            if idx == DIR_IDX:
                return Node("devdir", dev, None, None, entry)
            if idx == QUEUES_IDX:
                return Node("qsdir", dev, None, None, entry)
            if 1 <= idx <= len(DEV_FILES):
                return Node("file", dev, None, DEV_FILES[idx - 1], entry)
            raise _err(errno.ENOENT)
        q = qf - 1
        if q >= self._nr_queues(entry, self._shm(dev)):
            raise _err(errno.ENOENT)
        if idx == DIR_IDX:
            return Node("qdir", dev, q, None, entry)
        if 1 <= idx <= len(Q_FILES):
            return Node("qfile", dev, q, Q_FILES[idx - 1], entry)
        raise _err(errno.ENOENT)

    def _generate(self, node: Node) -> bytes:
        gen = node.spec[3]
        if node.dev is None:
            return gen(self._devices(), self._shm).encode()
        s = self._shm(node.dev)
        if node.q is None:
            return gen(node.dev, node.entry, s).encode()
        return gen(node.dev, node.entry, s, node.q).encode()

    def _attr(self, ino: int, node: Node) -> pyfuse3.EntryAttributes:
        kind, dev, q, spec, entry = node
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_uid = a.st_gid = 0
        a.generation = 0
        # never let the kernel answer from a stale picture of the devices
        a.entry_timeout = 0
        a.attr_timeout = 0
        a.st_blksize = 4096
        now = time.time_ns()
        if kind in ("root", "devdir", "qsdir", "qdir"):
            a.st_mode = stat.S_IFDIR | 0o555
            a.st_nlink = 2
            a.st_size = 0
            started = entry.get("started") if isinstance(entry, dict) else None
            t = int(started * 1e9) if isinstance(started, (int, float)) else self.mounted_ns
        else:
            name, fkind, mode, gen = spec
            a.st_mode = stat.S_IFREG | mode
            a.st_nlink = 1
            if fkind == "trace" or dev is None:
                # a stream has no size; nor does metrics, which costs too much to make for a stat
                a.st_size = 0
            else:
                try:
                    a.st_size = len(self._generate(node))
                except (Gone, pyfuse3.FUSEError):
                    a.st_size = 0
            t = now
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = t
        a.st_blocks = (a.st_size + 511) // 512
        return a

    def _children(self, ino: int):
        """[(name, ino)] of a directory, freshly from the source."""
        kind, dev, q, _spec, entry = self._node(ino)
        if kind == "root":
            return ([(n.encode(), ROOT_FILE_INO + i) for i, (n, *_r) in enumerate(ROOT_FILES)]
                    + [(stem(d).encode(), _ino(d)) for d in sorted(self._devices())])
        if kind == "devdir":
            return ([(n.encode(), _ino(dev, 0, i + 1)) for i, (n, *_r) in enumerate(DEV_FILES)]
                    + [(b"queues", _ino(dev, 0, QUEUES_IDX))])
        if kind == "qsdir":
            n = self._nr_queues(entry, self._shm(dev))
            return [(str(i).encode(), _ino(dev, i + 1)) for i in range(n)]
        if kind == "qdir":
            return [(n.encode(), _ino(dev, q + 1, i + 1)) for i, (n, *_r) in enumerate(Q_FILES)]
        raise _err(errno.ENOTDIR)

    # -- lookups -----------------------------------------------------------------
    async def lookup(self, parent_inode, name, ctx=None):
        kind, dev, q, _spec, entry = self._node(parent_inode)
        ino = None
        if kind == "root":
            d = from_stem(name.decode(errors="replace"))
            if name in ROOT_BY_NAME:
                ino = ROOT_FILE_INO + ROOT_BY_NAME[name]
            elif d is not None and d in self._devices():
                ino = _ino(d)
        elif kind == "devdir":
            if name == b"queues":
                ino = _ino(dev, 0, QUEUES_IDX)
            elif name in DEV_BY_NAME:
                ino = _ino(dev, 0, DEV_BY_NAME[name])
        elif kind == "qsdir":
            if name.isdigit() and name == str(int(name)).encode():
                qn = int(name)
                if qn < self._nr_queues(entry, self._shm(dev)):
                    ino = _ino(dev, qn + 1)
        elif kind == "qdir":
            if name in Q_BY_NAME:
                ino = _ino(dev, q + 1, Q_BY_NAME[name])
        else:
            raise _err(errno.ENOTDIR)
        if ino is None:
            raise _err(errno.ENOENT)
        return self._attr(ino, self._node(ino))

    async def getattr(self, inode, ctx=None):
        return self._attr(inode, self._node(inode))

    async def forget(self, inode_list):
        pass  # inodes carry no state

    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self._node(inode)
        only_truncate = (fields.update_size and attr.st_size == 0 and not
                         (fields.update_mode or fields.update_uid or fields.update_gid))
        # `echo rule > faults` truncates first: let it through so the write says why it fails
        if node.kind == "file" and node.spec[1] == "faults" and only_truncate:
            return self._attr(inode, node)
        raise _err(errno.EACCES)

    # -- directories ---------------------------------------------------------------
    async def opendir(self, inode, ctx):
        if self._node(inode).kind not in ("root", "devdir", "qsdir", "qdir"):
            raise _err(errno.ENOTDIR)
        fh = self._fh()
        self.dirs[fh] = inode
        return fh

    async def readdir(self, fh, start_id, token):
        ino = self.dirs.get(fh)
        if ino is None:
            raise _err(errno.EBADF)
        # listed afresh on every call; offsets are the children's inode numbers
        # (listed in ascending order), so they stay valid when devices come and
        # go between two calls of one listing
        for name, child in self._children(ino):
            if child <= start_id:
                continue
            try:
                attr = self._attr(child, self._node(child))
            except pyfuse3.FUSEError:
                continue  # vanished while we listed
            if not pyfuse3.readdir_reply(token, name, attr, child):
                break

    async def releasedir(self, fh):
        self.dirs.pop(fh, None)

    # -- files ---------------------------------------------------------------------
    async def open(self, inode, flags, ctx):
        node = self._node(inode)
        kind, dev, q, spec, entry = node
        if kind not in ("file", "qfile"):
            raise _err(errno.EISDIR)
        name, fkind, mode, gen = spec
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY
        fi = pyfuse3.FileInfo()
        fi.direct_io = True
        fi.keep_cache = False
        if fkind == "faults":
            try:
                data = b"" if writing else self._generate(node)
                if not writing and dev in self.fault_errors:
                    data += f"# last rejected line: {self.fault_errors[dev]}\n".encode()
                h = _Handle("faults", dev, data)
            except Gone:
                raise _err(errno.ENOENT) from None
        elif writing:
            raise _err(errno.EACCES)
        elif fkind == "trace":
            if sum(1 for h in self.handles.values() if h.kind == "trace") >= MAX_TRACE_READERS:
                raise _err(errno.EBUSY)
            s = self._shm(dev)
            if s is None:
                raise _err(errno.ENOENT)
            h = _Handle("trace", dev, trace=TraceReader(dev, s, ctx.pid, fmt=gen))
            # seekable, and every offset reads the stream on: `head -n 2` seeks back past what
            # it read and `tail -c +1 -f` asks where it is; both must not fail ("Illegal seek")
        else:
            try:
                h = _Handle("snap", dev, self._generate(node))
            except Gone:
                raise _err(errno.ENOENT) from None
        fi.fh = self._fh()
        self.handles[fi.fh] = h
        return fi

    async def read(self, fh, off, size):
        h = self.handles.get(fh)
        if h is None:
            raise _err(errno.EBADF)
        if h.kind != "trace":
            return h.data[off:off + size]
        return await h.trace.read(size, self._shm, lambda dev: dev in self._devices())

    async def write(self, fh, off, buf):
        h = self.handles.get(fh)
        if h is None:
            raise _err(errno.EBADF)
        if h.kind != "faults":
            raise _err(errno.EACCES)
        if len(h.written) + len(buf) > MAX_FAULT_WRITE:
            h.written = b""
            raise _err(errno.EFBIG)
        data = h.written + bytes(buf)
        done, _, h.written = data.rpartition(b"\n")
        if done:
            await self._fault_lines(h.dev, done)
        return len(buf)

    async def _fault_lines(self, dev: int, data: bytes) -> None:
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError:
            self.fault_errors[dev] = "not UTF-8 text"
            raise _err(errno.EINVAL) from None
        for line in lines:
            try:
                await trio.to_thread.run_sync(apply_fault_line, dev, line)
            except UblkError as e:
                # the writer only sees EINVAL: the reason goes to the log and the listing
                msg = f"{line.strip()[:120]!r}: {str(e)[:300]}"
                self.fault_errors[dev] = msg
                log.warning("stats tree: %s/faults: %s", stem(dev), msg)
                raise _err(errno.EINVAL) from None
        self.fault_errors.pop(dev, None)

    async def flush(self, fh):
        h = self.handles.get(fh)
        if h is not None and h.kind == "faults" and h.written.strip():
            # `printf 'fail' > faults` has no newline: the line ends with the file
            data, h.written = h.written, b""
            await self._fault_lines(h.dev, data)

    async def release(self, fh):
        self.handles.pop(fh, None)

    # -- namespace changes: the tree is the server's, not the user's -------------
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise _err(errno.EROFS)

    async def mkdir(self, parent_inode, name, mode, ctx):
        raise _err(errno.EROFS)

    async def create(self, parent_inode, name, mode, flags, ctx):
        raise _err(errno.EROFS)

    async def unlink(self, parent_inode, name, ctx):
        raise _err(errno.EROFS)

    async def rmdir(self, parent_inode, name, ctx):
        raise _err(errno.EROFS)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        raise _err(errno.EROFS)

    async def symlink(self, parent_inode, name, target, ctx):
        raise _err(errno.EROFS)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise _err(errno.EROFS)

    async def statfs(self, ctx):
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_namemax = 255
        return st
