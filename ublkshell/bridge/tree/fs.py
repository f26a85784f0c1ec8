"""The stats tree: every served device as a directory of small files under
/mnt/ublkstats, text for people and .json twins for scripts, plus a `trace`
file that streams IO records like tracefs' trace_pipe.

    ublkb<N>/info  info.json  params  params.json  stats  stats.json
             latency  latency.json  inflight  inflight.json  trace  faults
             queues/<q>/stats  stats.json  inflight
    fuse<N>/...  the same, for a FUSE-transport device (ublkshell/devices/ids.py)

It runs as pyfuse3 handlers on the server's trio loop. Nothing is cached:
each lookup, readdir and open asks the DeviceSource again, so devices appear
and vanish with the server's view of them."""
import errno
import functools
import inspect
import json
import logging
import os
import signal
import stat
import subprocess
import time
from typing import NamedTuple, Protocol

import pyfuse3
import trio

from ..._native import lib
from ...devices.ids import from_stem, stem
from ...errors import UblkError, UsageError
from ...kernel.mounts import is_mounted
from ...units import human
from ...observe.stats import Tail, fmt_ns, format_record, inflight, percentile, snapshot, summarize
from ...verbs import hist_bars, pow2_hist, stats_of, stats_table, tags_table
from ...kernel.uapi import feature_names
from ... import procs
from ...observe.shm import OPS, Shm

log = logging.getLogger(__name__)

FSNAME = "ublkstats"
POLL_S = 0.05
# a blocked trace read holds one of pyfuse3's worker tasks (99 at most): keep
# plenty for everything else
MAX_TRACE_READERS = 32
FAULTS_HELP = ("# one rule per line, e.g. `delay 5ms op=write`, `fail lba 2048..4095 op=read`;\n"
               "# `clear`, `clear ID`, `seed N`. Grammar: docs/faults.md\n")
MAX_FAULT_WRITE = 64 * 1024


class DeviceSource(Protocol):
    def devices(self) -> dict[int, dict]: ...

    def shm(self, dev_id: int) -> Shm | None: ...


# -- inode numbers -----------------------------------------------------------
# Derived from the path, so nothing needs remembering between requests and a
# device that comes back under the same id gets the same numbers:
#   (dev_id + 1) << 40 | queue field << 16 | index
# queue field 0 is the device directory level, q + 1 a queue's directory.
DIR_IDX = 0
QUEUES_IDX = 0xFFFF
_SHIFT_DEV, _SHIFT_Q, _MASK_Q, _MASK_IDX = 40, 16, 0xFFFFFF, 0xFFFF


def _ino(dev: int, qf: int = 0, idx: int = DIR_IDX) -> int:
    return ((dev + 1) << _SHIFT_DEV) | (qf << _SHIFT_Q) | idx


def _split(ino: int) -> tuple[int, int, int]:
    return (ino >> _SHIFT_DEV) - 1, (ino >> _SHIFT_Q) & _MASK_Q, ino & _MASK_IDX


def _dump(obj) -> str:
    return json.dumps(obj, sort_keys=True) + "\n"


class Gone(Exception):
    """The device (or its statistics) went away while we looked."""


# -- content -----------------------------------------------------------------
def _info(dev, entry, s):
    pid = entry.get("pid")
    flags = int(entry.get("flags") or 0)
    return {"id": dev, "target": entry.get("target"), "describe": entry.get("describe"),
            "size": entry.get("size"), "block_size": entry.get("block_size"),
            "queues": entry.get("queues"), "depth": entry.get("depth"),
            "pid": pid, "daemon_alive": procs.entry_daemon_alive(entry),
            "flags": flags, "flag_names": feature_names(flags),
            "recovery": entry.get("recovery"), "recoveries": entry.get("recoveries", 0)}


def info_text(dev, entry, s):
    i = _info(dev, entry, s)
    size = i["size"]
    size_s = f"{human(size)} ({size} bytes)" if isinstance(size, int) else "?"
    names = ",".join(i["flag_names"]) or "-"
    return (f"device      {stem(dev)}\n"
            f"target      {i['describe'] or i['target'] or '-'}\n"
            f"size        {size_s}\n"
            f"block size  {i['block_size'] if i['block_size'] is not None else '?'}\n"
            f"queues      {i['queues']} x {i['depth']}\n"
            f"daemon      pid {i['pid']} ({'alive' if i['daemon_alive'] else 'dead'})\n"
            f"flags       {i['flags']:#x} {names}\n"
            + f"recovery    {i['recovery'] or 'none'}"
              f"{', recovered ' + str(i['recoveries']) + ' times' if i['recoveries'] else ''}\n"
            + (f"transport   fuse: file {entry.get('file')}, block device {entry.get('loop') or '-'}\n"
               if entry.get("transport") == "fuse" else ""))


def info_json(dev, entry, s):
    return _dump(_info(dev, entry, s))


def _flatten(prefix, value, out):
    if isinstance(value, dict):
        for k in sorted(value, key=str):
            _flatten(f"{prefix}.{k}" if prefix else str(k), value[k], out)
    else:
        out.append((prefix, value))


def params_text(dev, entry, s):
    rows = []
    _flatten("", entry, rows)
    width = max((len(k) for k, _ in rows), default=0)
    return "".join(f"{k:<{width}}  {json.dumps(v) if not isinstance(v, str) else v}\n" for k, v in rows)


def params_json(dev, entry, s):
    return _dump(entry)


def _need(s):
    if s is None:
        raise Gone
    return s


def stats_text(dev, entry, s):
    r = stats_of(dev, _need(s))
    return stats_table(f"{stem(dev)}: {r['inflight']} in flight", [("", r["ops"])], all_ops=True) + "\n"


def stats_json(dev, entry, s):
    return _dump(stats_of(dev, _need(s)))


def _pow2_hist(hist):
    return pow2_hist((lib.us_hist_low(i), n) for i, n in enumerate(hist))


def _latency(op):
    sm = summarize(op)
    return {"ios": sm["ios"], "avg_ns": sm["avg_ns"], "p50_ns": sm["p50_ns"],
            "p90_ns": percentile(op["hist"], 90), "p99_ns": sm["p99_ns"],
            "p999_ns": sm["p999_ns"], "max_ns": sm["max_ns"], "hist": _pow2_hist(op["hist"])}


def latency_text(dev, entry, s):
    ops = snapshot(_need(s))["ops"]
    out = []
    for name in OPS:
        lat = _latency(ops[name])
        if not lat["ios"]:
            continue
        out.append(f"{name}: {lat['ios']} IOs, avg {fmt_ns(lat['avg_ns'])}, p50 {fmt_ns(lat['p50_ns'])}, "
                   f"p90 {fmt_ns(lat['p90_ns'])}, p99 {fmt_ns(lat['p99_ns'])}, "
                   f"p99.9 {fmt_ns(lat['p999_ns'])}, max {fmt_ns(lat['max_ns'])}")
        out += hist_bars(lat["hist"], 40, indent="  ")
    if not out:
        out.append(f"{stem(dev)}: no IO yet")
    return "\n".join(out) + "\n"


def latency_json(dev, entry, s):
    ops = snapshot(_need(s))["ops"]
    return _dump({"device": dev, "ops": {n: _latency(ops[n]) for n in OPS}})


def _tags(s, q=None):
    tags = inflight(_need(s))
    if q is not None:
        tags = [t for t in tags if t["queue"] == q]
    return sorted(tags, key=lambda t: -t["age_ns"])


def _tags_text(title, tags):
    return tags_table(title, tags) + "\n"


def inflight_text(dev, entry, s):
    return _tags_text(f"{stem(dev)}", _tags(s))


def inflight_json(dev, entry, s):
    return _dump({"device": dev, "tags": _tags(s)})


def faults_text(dev, entry, s):
    from ...faults.table import read_shm
    from ...faults.verbs import rules_table

    return FAULTS_HELP + rules_table(read_shm(_need(s))) + "\n"


def apply_fault_line(dev: int, line: str) -> None:
    """One line written to a device's `faults` file: a rule, `clear [ID]` or `seed N`,
    checked like the same verb from any other face."""
    from ...faults import table
    from ...verbs import call

    words = line.split()
    if not words or words[0].startswith("#"):
        return
    if words[0] == "clear":
        if len(words) > 2:
            raise UsageError("clear takes at most one rule id: clear, or clear 3")
        call("clear", {"id": dev, "rule": words[1] if len(words) == 2 else None})
    elif words[0] == "seed":
        if len(words) != 2:
            raise UsageError("seed takes one whole number: seed 1234")
        call("seed", {"id": dev, "seed": words[1]})
    else:
        # a rule line: the rule grammar checks it (columns count in this line)
        table.add(dev, line)


def _queue_snap(s, q):
    snap = snapshot(_need(s))
    if q >= len(snap["queues"]):
        raise Gone
    return snap["queues"][q]


def q_stats_text(dev, entry, s, q):
    qs = _queue_snap(s, q)
    ops = {n: summarize(o) for n, o in qs["ops"].items()}
    return stats_table(f"{stem(dev)} queue {q}: {qs['inflight']} in flight", [("", ops)], all_ops=True) + "\n"


def q_stats_json(dev, entry, s, q):
    qs = _queue_snap(s, q)
    return _dump({"device": dev, "queue": q, "inflight": qs["inflight"],
                  "ops": {n: summarize(o) for n, o in qs["ops"].items()}})


def q_inflight_text(dev, entry, s, q):
    return _tags_text(f"{stem(dev)} queue {q}", _tags(s, q))


# kinds: "snap" (generated per open), "trace" (stream), "faults" (rules, writable)
DEV_FILES = [("info", "snap", 0o444, info_text), ("info.json", "snap", 0o444, info_json),
             ("params", "snap", 0o444, params_text), ("params.json", "snap", 0o444, params_json),
             ("stats", "snap", 0o444, stats_text), ("stats.json", "snap", 0o444, stats_json),
             ("latency", "snap", 0o444, latency_text), ("latency.json", "snap", 0o444, latency_json),
             ("inflight", "snap", 0o444, inflight_text), ("inflight.json", "snap", 0o444, inflight_json),
             ("trace", "trace", 0o444, None), ("faults", "faults", 0o600, faults_text)]
Q_FILES = [("stats", "snap", 0o444, q_stats_text), ("stats.json", "snap", 0o444, q_stats_json),
           ("inflight", "snap", 0o444, q_inflight_text)]
_DEV_BY_NAME = {name.encode(): i + 1 for i, (name, *_rest) in enumerate(DEV_FILES)}
_Q_BY_NAME = {name.encode(): i + 1 for i, (name, *_rest) in enumerate(Q_FILES)}


def _pending_signal(tid: int) -> bool:
    """Whether the thread that opened a trace file has a signal waiting.

    pyfuse3 ignores FUSE_INTERRUPT, and the kernel will not let a reader go
    (not even on SIGKILL) once its read reached us: a Ctrl-C'd `cat` would
    hang in D state until the next record. So we watch the reader ourselves
    and answer EINTR, which is what the interrupt would have asked for."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            text = f.read()
    except OSError:
        return False
    masks = {}
    for line in text.splitlines():
        key, _, val = line.partition(b":")
        if key in (b"SigPnd", b"ShdPnd", b"SigBlk"):
            try:
                masks[key] = int(val.strip(), 16)
            except ValueError:
                return False
    pending = masks.get(b"SigPnd", 0) | masks.get(b"ShdPnd", 0)
    # a fatal signal shows up as SIGKILL pending, which no mask holds back
    return bool(pending & ~masks.get(b"SigBlk", 0)) or bool(pending & (1 << (signal.SIGKILL - 1)))


class Node(NamedTuple):
    kind: str  # root, devdir, qsdir (queues/), qdir (queues/<q>/), file, qfile
    dev: int | None
    q: int | None
    spec: tuple | None  # the DEV_FILES / Q_FILES row of a file
    entry: dict | None


class _Trace:
    def __init__(self, dev: int, s: Shm, tid: int):
        self.dev, self.s, self.tid = dev, s, tid
        self.restart(s, from_start=False)
        self.pending = b""

    def restart(self, s: Shm, from_start: bool = True) -> None:
        # a reader has seen nothing of a restarted daemon's rings: from their start
        self.s, self.tail, self.reported_lost = s, Tail(s, from_start=from_start), 0
        self.created = int(s.hdr.created_mono_ns)


class _Handle:
    def __init__(self, kind, dev, data=b"", trace=None):
        self.kind, self.dev, self.data, self.trace = kind, dev, data, trace
        self.written = b""  # faults: a line not finished yet


def _guard(fn):
    """Unexpected errors become EIO: an exception escaping a handler would
    end pyfuse3's main loop (and with it the tree) and leave a dead mount."""
    if fn.__name__ == "forget":
        # the kernel expects no answer to a forget: nothing to turn an error into
        @functools.wraps(fn)
        async def quiet(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except Exception as e:
                log.error("stats tree: forget failed: %s: %s", type(e).__name__, e)
        return quiet

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Gone:
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception as e:
            log.error("stats tree: %s failed: %s: %s", fn.__name__, type(e).__name__, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


def guard_handlers(cls):
    """_guard every request handler a pyfuse3.Operations subclass defines."""
    for name, fn in list(vars(cls).items()):
        if inspect.iscoroutinefunction(fn) and hasattr(pyfuse3.Operations, name):
            setattr(cls, name, _guard(fn))
    return cls


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
            if fkind == "trace":
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
            return [(stem(d).encode(), _ino(d)) for d in sorted(self._devices())]
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
            if d is not None and d in self._devices():
                ino = _ino(d)
        elif kind == "devdir":
            if name == b"queues":
                ino = _ino(dev, 0, QUEUES_IDX)
            elif name in _DEV_BY_NAME:
                ino = _ino(dev, 0, _DEV_BY_NAME[name])
        elif kind == "qsdir":
            if name.isdigit() and name == str(int(name)).encode():
                qn = int(name)
                if qn < self._nr_queues(entry, self._shm(dev)):
                    ino = _ino(dev, qn + 1)
        elif kind == "qdir":
            if name in _Q_BY_NAME:
                ino = _ino(dev, q + 1, _Q_BY_NAME[name])
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
            h = _Handle("trace", dev, trace=_Trace(dev, s, ctx.pid))
            fi.nonseekable = True
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
        return await self._read_trace(h.trace, size)

    async def _read_trace(self, tr: _Trace, size: int) -> bytes:
        polls = 0
        while not tr.pending:
            s = self._shm(tr.dev)
            # the server's registry is files on disk: not worth a scan every 50 ms per reader
            if s is None or (polls % 20 == 0 and tr.dev not in self._devices()):
                raise _err(errno.EIO)
            polls += 1
            if s is not tr.s or s.hdr.created_mono_ns != tr.created:
                # a new daemon under the same id (new file, or the old one laid
                # out again): the old cursors mean nothing in the new rings
                tr.restart(s)
                tr.pending = b"# statistics restarted\n"
                break
            recs = tr.tail.poll()
            lines = []
            if tr.tail.lost > tr.reported_lost:
                lines.append(f"# {tr.tail.lost - tr.reported_lost} records lost")
                tr.reported_lost = tr.tail.lost
            lines += [format_record(r) for r in recs]
            if lines:
                tr.pending = ("\n".join(lines) + "\n").encode()
                break
            if _pending_signal(tr.tid):
                raise _err(errno.EINTR)
            await trio.sleep(POLL_S)
        data = tr.pending
        if len(data) <= size:
            tr.pending = b""
            return data
        cut = data.rfind(b"\n", 0, size) + 1
        if cut == 0:
            cut = size  # a reader with a tiny buffer still makes progress
        tr.pending = data[cut:]
        return data[:cut]

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



# -- mounting ------------------------------------------------------------------
_active = False


def _dead(mp: str) -> bool:
    try:
        os.stat(mp)
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def unmount_stale(mountpoint: str) -> bool:
    """Detach what a crashed server left on mountpoint (a FUSE mount whose
    daemon is gone: every access gives ENOTCONN). True if it did."""
    mp = os.path.abspath(mountpoint)
    cleaned = False
    # crashes can stack several dead mounts on one point: peel them all
    for _ in range(8):
        if not _dead(mp):
            break
        for cmd in (["fusermount3", "-u", "-z", mp], ["umount", "-l", mp]):
            try:
                r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, timeout=10, check=False)
            except (OSError, subprocess.SubprocessError):
                continue
            if r.returncode == 0:
                cleaned = True
                break
        else:
            break
    return cleaned and not _dead(mp)


async def run_tree(mountpoint: str, source: DeviceSource, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Mount the stats tree on mountpoint and serve it until cancelled; then
    unmount. Calls task_status.started() once the mount is in place."""
    global _active
    if _active:
        # pyfuse3 keeps its session in module globals: one tree per process
        raise UblkError("the stats tree is already mounted by this process")
    _active = True
    try:
        await _mount_and_serve(os.path.abspath(mountpoint), source, task_status)
    finally:
        _active = False


async def _mount_and_serve(mp: str, source: DeviceSource, task_status) -> None:
    await trio.to_thread.run_sync(unmount_stale, mp)
    try:
        os.makedirs(mp, mode=0o755, exist_ok=True)
    except OSError as e:
        raise UblkError(f"{mp}: cannot create the mount point: {e.strerror}") from None
    if not os.path.isdir(mp):
        raise UblkError(f"{mp}: not a directory")
    if is_mounted(mp):
        raise UblkError(f"{mp}: something is already mounted there (another server?)")
    ops = StatsTree(source)
    options = set(pyfuse3.default_options) | {f"fsname={FSNAME}"}
    try:
        pyfuse3.init(ops, mp, options)
    except RuntimeError as e:
        if "mount" in str(e):
            pyfuse3.close(unmount=False)  # the session exists, only the mount failed
        raise UblkError(f"{mp}: cannot mount the stats tree ({e}); it needs root and /dev/fuse") from None
    try:
        task_status.started()
        try:
            await pyfuse3.main()
        except* OSError as group:
            # pyfuse3 runs its workers in a nursery: failures come grouped
            e = group
            while isinstance(e, BaseExceptionGroup):
                e = e.exceptions[0]
            raise UblkError(f"stats tree on {mp} stopped: {getattr(e, 'strerror', None) or e}") from None
    finally:
        ops.handles.clear()
        ops.dirs.clear()
        pyfuse3.close(unmount=True)
