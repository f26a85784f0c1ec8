"""The stats tree's `trace` files: each open one follows the device's record rings and
hands out whole lines, like tracefs' trace_pipe; a read blocks until there is one.
`trace` has the text `ublkshell trace` prints, `trace.json` a JSON object per line, as
`trace --json` prints them; what is no record (records lost, a restart) is a `#` comment
in the one and an object of its own in the other (docs/schema.md: trace_lost, trace_restarted)."""
import errno
import json
import signal

import pyfuse3
import trio

from ...devices.ids import name as dev_name
from ...observe.objects import trace_note
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

    def __init__(self, dev: int, s: Shm, tid: int, fmt: str = "text"):
        self.dev, self.s, self.tid, self.name = dev, s, tid, dev_name(dev)
        self.json = fmt == "json"
        self.restart(s, from_start=False)
        self.pending = b""

    def restart(self, s: Shm, from_start: bool = True) -> None:
        # a reader has seen nothing of a restarted daemon's rings: from their start
        self.s, self.cursor, self.reported_lost = s, Cursor(s, from_start=from_start, device=self.name), 0
        self.created = int(s.hdr.created_mono_ns)

    def _line(self, r: dict) -> str:
        return json.dumps(r, sort_keys=True) if self.json else format_record(r)

    def _note(self, lost: int = 0) -> str:
        if self.json:
            return json.dumps(trace_note(self.name, lost), sort_keys=True)
        return f"# {lost} records lost" if lost else "# statistics restarted"

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
                tr.pending = (tr._note() + "\n").encode()
                break
            recs = tr.cursor.poll()
            lines = []
            if tr.cursor.lost > tr.reported_lost:
                lines.append(tr._note(tr.cursor.lost - tr.reported_lost))
                tr.reported_lost = tr.cursor.lost
            lines += [tr._line(r) for r in recs]
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
