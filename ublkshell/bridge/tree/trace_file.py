"""The stats tree's `trace` files: each open one follows the device's record rings and
hands out whole lines, like tracefs' trace_pipe; a read blocks until there is one."""
import errno
import signal

import pyfuse3
import trio

from ...observe.shm import Shm
from ...observe.trace import Cursor, format_record

POLL_S = 0.05


def pending_signal(tid: int) -> bool:
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


class TraceReader:
    """One open `trace` file: a cursor in the device's record rings and the text not read yet."""

    def __init__(self, dev: int, s: Shm, tid: int):
        self.dev, self.s, self.tid = dev, s, tid
        self.restart(s, from_start=False)
        self.pending = b""

    def restart(self, s: Shm, from_start: bool = True) -> None:
        # a reader has seen nothing of a restarted daemon's rings: from their start
        self.s, self.cursor, self.reported_lost = s, Cursor(s, from_start=from_start), 0
        self.created = int(s.hdr.created_mono_ns)

    async def read(self, size: int, shm_of, exists) -> bytes:
        """The next whole lines, at most size bytes; shm_of(dev) and exists(dev) ask the tree."""
        tr = self
        polls = 0
        while not tr.pending:
            s = shm_of(tr.dev)
            # the server's registry is files on disk: not worth a scan every 50 ms per reader
            if s is None or (polls % 20 == 0 and not exists(tr.dev)):
                raise pyfuse3.FUSEError(errno.EIO)
            polls += 1
            if s is not tr.s or s.hdr.created_mono_ns != tr.created:
                # a new daemon under the same id (new file, or the old one laid
                # out again): the old cursors mean nothing in the new rings
                tr.restart(s)
                tr.pending = b"# statistics restarted\n"
                break
            recs = tr.cursor.poll()
            lines = []
            if tr.cursor.lost > tr.reported_lost:
                lines.append(f"# {tr.cursor.lost - tr.reported_lost} records lost")
                tr.reported_lost = tr.cursor.lost
            lines += [format_record(r) for r in recs]
            if lines:
                tr.pending = ("\n".join(lines) + "\n").encode()
                break
            if pending_signal(tr.tid):
                raise pyfuse3.FUSEError(errno.EINTR)
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
