"""`ublkshell replay LOG [TARGET]`: a dm-log-writes log replayed onto a device or an image
file, to any entry or mark, with an optional check at each persistence point (what
fstests' replay-log does with the logs of the kernel's log-writes target).

Discards are replayed as zeroes (BLKZEROOUT on a device, a punched hole in a file), so a
replay is the same bytes on every target, as on a device whose discards read back zero."""
from __future__ import annotations

import errno
import json
import os
import shlex
import stat
import sys

from ..errors import UblkError, UsageError
from ..validate import Arg, check, flag, text, whole, U64
from .logwrites import DISCARD, FLUSH, MARK, Entry, Log, flag_names
from .progress import Progress

CHECK_AT = ("flush", "mark", "each")
# a check's output is shown only when it fails: its last lines
CHECK_TAIL = 20
CHUNK = 4 << 20
BLKZEROOUT = 0x127F  # _IO(0x12, 127)
FALLOC_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE

REPLAY_ARGS = {
    "log": Arg("LOG", text(4096), required=True),
    "target": Arg("TARGET", text(4096)),
    "list": Arg("--list", flag, False),
    "json": Arg("--json", flag, False),
    "to_entry": Arg("--to-entry", whole(0, U64)),
    "to_mark": Arg("--to-mark", text(4096)),
    "size": Arg("--size", text(64)),
    "check": Arg("--check", text(4096)),
    "check_at": Arg("--check-at", text(16), "flush"),
    "skip": Arg("--skip", text(1 << 20)),
}


def run(args: dict) -> int:
    a = check("replay", REPLAY_ARGS, args)
    if a["to_entry"] is not None and a["to_mark"] is not None:
        raise UsageError("replay: --to-entry or --to-mark, not both")
    if a["check_at"] not in CHECK_AT:
        raise UsageError(f"replay: --check-at {a['check_at']!r}: choose from {', '.join(CHECK_AT)}")
    if a["list"]:
        if a["target"] or a["size"] or a["check"]:
            raise UsageError("replay: --list reads the log only (no TARGET, --size or --check)")
    elif not a["target"]:
        raise UsageError("replay: which TARGET (a block device or an image file)? or --list")
    check_argv = _check_argv(a["check"]) if a["check"] else None
    skip = _skip(a["skip"]) if a["skip"] else set()
    with Log(a["log"]) as log:
        entries = _until(log, a["to_entry"], a["to_mark"])
        if skip:
            writes = {e.index for e in entries if e.data_at >= 0 or e.flags & DISCARD}
            bad = sorted(skip - writes)
            if bad:
                raise UsageError(f"replay: --skip {bad[0]}: not a write or discard entry of the entries "
                                 "replayed (see --list)")
            entries = [e for e in entries if e.index not in skip]
        if a["list"]:
            return _list(entries, a["json"])
        return _replay(log, entries, a, check_argv)


def _skip(text: str) -> set[int]:
    """`--skip 12,15,40`: entries left out (a crash state in which those writes never persisted)."""
    out = set()
    for word in text.split(","):
        if not word.strip().isdigit():
            raise UsageError(f"replay: --skip: {word.strip()[:20]!r} is not an entry number "
                             "(give N,N,... as `--list` counts them)")
        out.add(int(word))
    return out


def _check_argv(cmd: str) -> list[str]:
    try:
        argv = shlex.split(cmd)
    except ValueError as e:
        raise UsageError(f"replay: --check: {e}") from None
    if not argv:
        raise UsageError("replay: --check: an empty command")
    return argv


def _until(log: Log, to_entry: int | None, to_mark: str | None) -> list[Entry]:
    """The entries to replay: all, or through entry N, or through the first mark NAME."""
    out, marks = [], []
    for e in log:
        out.append(e)
        if to_entry is not None and e.index == to_entry:
            return out
        if e.flags & MARK:
            if to_mark is not None and e.mark == to_mark:
                return out
            marks.append(e.mark)
    if to_entry is not None:
        has = f"{len(out)} entries (0..{len(out) - 1})" if out else "no entries"
        raise UsageError(f"replay: --to-entry {to_entry}: {log.path} has {has}")
    if to_mark is not None:
        shown = ", ".join(repr(m) for m in marks[:10]) + (f" and {len(marks) - 10} more" if len(marks) > 10 else "")
        raise UsageError(f"replay: no mark named {to_mark!r} in {log.path} "
                         f"({'its marks: ' + shown if marks else 'it has no marks'})")
    return out


def _list(entries: list[Entry], as_json: bool) -> int:
    for e in entries:
        if as_json:
            print(json.dumps({"entry": e.index, "flags": flag_names(e.flags).split("|"), "sector": e.sector,
                              "sectors": e.nr_sectors, "mark": e.mark}))
        else:
            what = f"mark {_shown(e.mark)}" if e.flags & MARK else (
                f"sector {e.sector} +{e.nr_sectors}" if e.nr_sectors else "")
            print(f"{e.index:8d} {flag_names(e.flags):<20s} {what}".rstrip())
    return 0


def _shown(text: str) -> str:
    """A mark's name as a terminal may show it: a log is anyone's file, and its control
    characters (an escape sequence) are printed as escapes, not sent to the terminal."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class Target:
    """TARGET, opened for writing: a block device exclusively (never a mounted one), a file
    never through a symlink (a path in a shared directory cannot be turned into root's file)."""

    def __init__(self, path: str, size: int | None, log: Log):
        self.path = path
        if size is not None:
            from ..files import open_nofollow

            try:
                self.fd = open_nofollow(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                raise UblkError(f"replay: {path} exists: replay onto it without --size, or remove it") from None
            except OSError as e:
                raise UblkError(f"replay: {path}: {e.strerror}") from None
            os.ftruncate(self.fd, size)
        else:
            self.fd = _open_existing(path)
        st = os.fstat(self.fd)
        lst = os.fstat(log.fd)
        if (st.st_dev, st.st_ino) == (lst.st_dev, lst.st_ino) or (
                stat.S_ISBLK(st.st_mode) and st.st_rdev == lst.st_rdev and stat.S_ISBLK(lst.st_mode)):
            self.close()
            raise UsageError(f"replay: {path} is the log itself")
        self.is_dev = stat.S_ISBLK(st.st_mode)
        self.size = os.lseek(self.fd, 0, os.SEEK_END) if self.is_dev else None
        # what a rebuild of a state needs: an image as large as this target
        self.length = self.size if self.is_dev else st.st_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def reopen(self) -> None:
        self.fd = _open_existing(self.path)

    def fits(self, e: Entry, ss: int) -> None:
        if self.size is not None and (e.sector + e.nr_sectors) * ss > self.size:
            raise UblkError(f"replay: entry {e.index} writes sectors {e.sector}+{e.nr_sectors} of "
                            f"{ss} bytes, past the end of {self.path} ({self.size} bytes)")

    def zero(self, offset: int, length: int) -> None:
        if self.is_dev:
            import fcntl
            import struct

            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
            return
        _zero_file(self.fd, offset, length)


def _zero_file(fd: int, offset: int, length: int) -> None:
    if _punch(fd, offset, length):
        return
    buf = bytes(min(length, CHUNK))
    while length:
        n = os.pwrite(fd, buf[:min(length, len(buf))], offset)
        offset, length = offset + n, length - n


def _open_existing(path: str) -> int:
    """A block device (exclusively) or a regular file, for writing. Anything else is refused
    before it is opened: opening a FIFO, a tty or a tape has effects of its own."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UblkError(f"replay: {path}: {e.strerror}") from None
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise UblkError(f"replay: {path} is neither a block device nor a file")
    if os.path.islink(path):
        # /dev/disk/by-id/... names a device; a link to a file is refused
        if not stat.S_ISBLK(st.st_mode):
            raise UblkError(f"replay: {path} is a symlink to a file: refusing to follow it (name the file)")
        path = os.path.realpath(path)
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        # O_EXCL on a block device: refused while it is mounted or held
        fd = os.open(path, flags | (os.O_EXCL if stat.S_ISBLK(st.st_mode) else 0))
    except OSError as e:
        why = "it is mounted or in use" if e.errno == errno.EBUSY else e.strerror
        raise UblkError(f"replay: {path}: {why}") from None
    now = os.fstat(fd).st_mode
    if stat.S_IFMT(now) != stat.S_IFMT(st.st_mode):
        os.close(fd)
        raise UblkError(f"replay: {path} changed while it was being opened")
    return fd


_fallocate = []


def _punch(fd: int, offset: int, length: int) -> bool:
    if not _fallocate:
        import ctypes

        # the process's own libc (no ldconfig run to find it)
        f = ctypes.CDLL(None, use_errno=True).fallocate
        f.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
        _fallocate.append(f)
    return _fallocate[0](fd, FALLOC_PUNCH, offset, length) == 0


def _replay(log: Log, entries: list[Entry], a: dict, check_argv: list[str] | None) -> int:
    from ..units import parse_size

    ss = log.super.sectorsize
    size = parse_size(a["size"], "--size") if a["size"] else None
    target = Target(a["target"], size, log)
    counts = {"writes": 0, "discards": 0, "flushes": 0, "marks": 0, "bytes": 0, "checks": 0}
    progress = Progress("replay", "entry", len(entries))
    try:
        # a target too small is said before anything is written to it
        for e in entries:
            target.fits(e, ss)
        for e in entries:
            if e.flags & DISCARD:
                target.zero(e.sector * ss, e.nr_sectors * ss)
                counts["discards"] += 1
            elif e.data_at >= 0:
                _write_data(log, e, target.fd, target.path)
                counts["writes"] += 1
                counts["bytes"] += e.nr_sectors * ss
            if e.flags & FLUSH:
                counts["flushes"] += 1
            if e.flags & MARK:
                counts["marks"] += 1
            progress(e.index + 1)
            if check_argv and _check_point(e, a["check_at"]):
                counts["checks"] += 1
                failed = _run_check(target, check_argv, e)
                if failed:
                    progress.done()
                    return _report_failure(a, e, failed, counts, target.length)
        os.fsync(target.fd)
    finally:
        progress.done()
        target.close()
    last = entries[-1].index if entries else None
    result = {"log": a["log"], "target": a["target"], "entries": len(entries), "last_entry": last,
              "sector_size": ss, **counts}
    if a["json"]:
        print(json.dumps(result, sort_keys=True))
    else:
        from ..units import human

        checked = f"; {counts['checks']} checks passed" if check_argv else ""
        print(f"replayed {len(entries)} entries onto {a['target']}: {counts['writes']} writes "
              f"({human(counts['bytes'])}), {counts['discards']} discards, {counts['flushes']} flushes, "
              f"{counts['marks']} marks{checked}")
    return 0


def _write_data(log: Log, e: Entry, fd: int, path: str) -> None:
    ss = log.super.sectorsize
    done, total = 0, e.nr_sectors * ss
    while done < total:
        data = log.read_data(e, done, min(CHUNK, total - done))
        n = os.pwrite(fd, data, e.sector * ss + done)
        if n != len(data):
            raise UblkError(f"replay: {path}: a short write at entry {e.index}")
        done += n


def apply_to_file(log: Log, e: Entry, fd: int) -> None:
    """One entry onto an image file (crashtest's states): data as written, a discard as a
    punched hole (zeroes); flushes and marks change nothing."""
    ss = log.super.sectorsize
    if e.flags & DISCARD:
        _zero_file(fd, e.sector * ss, e.nr_sectors * ss)
    elif e.data_at >= 0:
        _write_data(log, e, fd, "an image")


def _check_point(e: Entry, at: str) -> bool:
    if at == "each":
        return True
    if at == "mark":
        return bool(e.flags & MARK)
    return e.persists


def _run_check(target: Target, argv: list[str], e: Entry) -> tuple[int, str] | None:
    """Run the check on what is replayed so far; (exit status, output tail) if it failed."""
    os.fsync(target.fd)
    # the check opens TARGET itself (fsck opens a device exclusively): ours is closed meanwhile
    target.close()
    import subprocess

    env = dict(os.environ, UBLKSHELL_REPLAY_ENTRY=str(e.index), UBLKSHELL_REPLAY_TARGET=target.path)
    try:
        p = subprocess.run([target.path if w == "{}" else w for w in argv], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    except OSError as err:
        raise UblkError(f"replay: --check: {argv[0]}: {err.strerror}") from None
    finally:
        target.reopen()
    if p.returncode == 0:
        return None
    tail = p.stdout.decode(errors="replace").splitlines()[-CHECK_TAIL:]
    return p.returncode, "\n".join(tail)


def _report_failure(a: dict, e: Entry, failed: tuple[int, str], counts: dict, length: int) -> int:
    rc, tail = failed
    rebuild = (f"ublkshell replay {shlex.quote(a['log'])} NEW.img --size {length} --to-entry {e.index}"
               + (f" --skip {a['skip']}" if a["skip"] else ""))
    if a["json"]:
        print(json.dumps({"log": a["log"], "target": a["target"], "failed_entry": e.index,
                          "flags": flag_names(e.flags).split("|"), "check_status": rc, "output": tail,
                          "rebuild": rebuild, **counts}, sort_keys=True))
    else:
        print(tail)
        print(f"ublkshell: replay: the check exited {rc} after entry {e.index} ({flag_names(e.flags)}); "
              f"{a['target']} holds that state. Rebuild it: {rebuild}", file=sys.stderr)
    return 1
