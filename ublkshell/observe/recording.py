"""`record` and the trace formats other tools read back: blktrace's binary files (blkparse,
btt) and fio's iolog v3 (`fio --read_iolog`), both written in the order the IOs began.

Records arrive in the order the IOs completed. The writers want the order they began
(fio replays its log top to bottom; blktrace numbers each CPU's events in time order),
so events wait in a heap until no IO can still come that began before them: none still
in flight (the tags' states in the shared memory say when each began) and none that the
daemon may be about to take (a margin of SETTLE_NS).
"""
import contextlib
import heapq
import os
import shlex
import signal
import threading
import time

from .._native import lib
from ..errors import UblkError, UsageError
from .names import ACTION_CODES
from .outputs import Outputs
from . import blktrace
from .shm import Shm
from .trace import Follow

# an IO the daemon has taken but not yet marked in flight is at most this old
SETTLE_NS = 100_000_000
# an IO held longer (a hang rule, a stuck store) no longer holds the others back: what
# began before it is written, and it goes in late (counted)
MAX_LAG_NS = 10_000_000_000
FORMATS = ("blktrace", "fio-iolog")
# ublk op -> fio iolog action; write_zeroes (and any other op) has none in fio: left out, counted
IOLOG_ACTIONS = {"read": "read", "write": "write", "flush": "sync", "discard": "trim"}


def in_flight_since(s: Shm) -> int:
    """Where the records can be written up to (ns since the device's stats began): the
    earliest start of an IO in flight now, no earlier than MAX_LAG_NS ago (nor later than
    SETTLE_NS ago). IOs a hang rule withholds do not count: they come back only when told."""
    base = int(s.hdr.created_mono_ns)
    now = lib.us_now_ns()
    low = now - SETTLE_NS
    hang = ACTION_CODES.get("hang", -1)
    for q in range(s.nr_queues):
        tags = s.tags(q)
        for t in range(s.depth):
            ts = tags[t]
            if ts.state and ts.t_start_ns and (ts.fault & 0xFF) != hang:
                low = min(low, int(ts.t_start_ns))
    return max(low, now - MAX_LAG_NS) - base


class Ordered:
    """Items keyed by time, released in time order once no earlier one can arrive."""

    def __init__(self):
        self.heap: list = []
        self.n = 0

    def add(self, t: int, item) -> None:
        heapq.heappush(self.heap, (t, self.n, item))
        self.n += 1

    def release(self, before: int | None = None) -> list:
        """Items older than before (all of them with None), oldest first."""
        out = []
        while self.heap and (before is None or self.heap[0][0] < before):
            out.append(heapq.heappop(self.heap)[2])
        return out


def stale_queue_files(base: str, nr_queues: int) -> list[str]:
    """BASE.blktrace.N for N >= nr_queues, up to the first gap: blkparse -i BASE would read
    them with ours (another run's, of a device with more queues)."""
    out, q = [], nr_queues
    while os.path.lexists(f"{base}.blktrace.{q}"):
        out.append(f"{base}.blktrace.{q}")
        q += 1
    return out


class BlktraceFiles:
    """BASE.blktrace.Q for each queue Q, as blktrace writes BASE.blktrace.CPU."""

    def __init__(self, base: str, nr_queues: int, pid: int, devnum: tuple[int, int], force: bool):
        self.base = base
        self.paths = [f"{base}.blktrace.{q}" for q in range(nr_queues)]
        self.outputs = Outputs(self.paths, force, binary=True, stale=stale_queue_files(base, nr_queues))
        self.files = self.outputs.files
        self.pid, self.dev = pid, blktrace.kernel_dev(*devnum)
        for q, f in enumerate(self.files):
            f.write(blktrace.process_note(pid, self.dev, q))
        self.seq = [0] * nr_queues
        self.last = [0] * nr_queues
        self.ios = self.late = 0
        self.pending = Ordered()

    def add(self, r: dict) -> None:
        self.ios += 1
        for ev in blktrace.events(r):
            self.pending.add(ev[0], (r["queue"], ev))

    def flush(self, before: int | None) -> None:
        for q, ev in self.pending.release(before):
            self.seq[q] += 1
            if ev[0] < self.last[q]:
                self.late += 1
            self.last[q] = max(self.last[q], ev[0])
            self.files[q].write(blktrace.pack(self.seq[q], ev, self.pid, self.dev, q))

    def close(self) -> None:
        self.flush(None)

    def summary(self) -> dict:
        b = shlex.quote(self.base)
        return {"format": "blktrace", "files": self.paths, "ios": self.ios, "late": self.late,
                "read_with": [f"blkparse -i {b}", f"blkparse -q -i {b} -d {b}.bin && btt -i {b}.bin"]}


class Iolog:
    """An fio iolog v3: `fio --read_iolog=FILE [--replay_redirect=DEVICE]` replays it. out:
    a text stream (trace's stdout), or with path and force, a file of its own."""

    def __init__(self, device: str, out=None, path: str | None = None, force: bool = False):
        self.outputs = Outputs([path], force, binary=False) if path else None
        self.out = self.outputs.files[0] if path else out
        self.device, self.path = device, path
        self.ios = self.late = 0
        self.skipped: dict[str, int] = {}
        self.t0: int | None = None
        self.last_us = 0
        self.pending = Ordered()
        self.out.write(f"fio version 3 iolog\n0 {device} add\n0 {device} open\n")

    def add(self, r: dict) -> None:
        if r["op"] not in IOLOG_ACTIONS:
            self.skipped[r["op"]] = self.skipped.get(r["op"], 0) + 1
            return
        self.ios += 1
        self.pending.add(r["t_ns"], r)

    def flush(self, before: int | None) -> None:
        lines = []
        for r in self.pending.release(before):
            if self.t0 is None:
                self.t0 = r["t_ns"]
            # microseconds since the first IO, as fio writes them; never back in time
            us = (r["t_ns"] - self.t0) // 1000
            if us < self.last_us:
                self.late += 1
            self.last_us = max(self.last_us, us)
            lines.append(f"{self.last_us} {self.device} {IOLOG_ACTIONS[r['op']]} "
                         f"{r['sector'] << 9} {r['sectors'] << 9}\n")
        if lines:
            self.out.write("".join(lines))
            self.out.flush()

    def close(self) -> None:
        self.flush(None)
        self.out.write(f"{self.last_us} {self.device} close\n")
        self.out.flush()

    def summary(self) -> dict:
        return {"format": "fio-iolog", "files": [self.path] if self.path else [], "ios": self.ios,
                "late": self.late, "skipped": self.skipped,
                "read_with": [f"fio --name=replay --read_iolog={shlex.quote(self.path or 'FILE')} "
                              "--replay_redirect=DEVICE --replay_no_stall=1"]}


class _Stop:
    """The first Ctrl-C, SIGTERM or SIGHUP asks the pump to stop; a second one gives up."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.asked = False

    def __call__(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True

    @contextlib.contextmanager
    def installed(self):
        # only the main thread may set handlers; elsewhere (tests) stops come as exceptions
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {sig: signal.signal(sig, self) for sig in self.SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


def pump(s: Shm, follow: Follow, writer, duration_s: float = 0.0, interval: float = 0.05) -> int:
    """Move records from follow into writer until its count, the duration or a stop (Ctrl-C,
    SIGTERM, SIGHUP: `timeout 30 ublkshell record ...`), then close it; returns the records
    lost. A writer with files of its own puts them in place only if everything was written,
    and removes them otherwise (a second stop discards them).

    A stop is a flag the loop reads between batches, never an exception: records a poll took
    from the rings are in the writer before the loop looks at it, and what completed before
    the stop is drained into the recording after it."""
    deadline = time.monotonic() + duration_s if duration_s else None
    outputs = writer.outputs
    try:
        with _Stop().installed() as stop:
            while True:
                # the mark comes first: an IO that completes after it was in flight at it
                mark = in_flight_since(s)
                for r in follow.poll():
                    writer.add(r)
                writer.flush(mark)
                if stop.asked or follow.done or (deadline and time.monotonic() >= deadline):
                    break
                time.sleep(interval)
            if stop.asked and not follow.done:
                for r in follow.poll():
                    writer.add(r)
            writer.close()
    except BrokenPipeError:
        raise  # a reader of stdout that left: the command's own business
    except OSError as e:
        if outputs:
            outputs.discard()
        where = e.filename or (outputs.dir if outputs else "the output")
        raise UblkError(f"record: writing {where} failed: {e.strerror}") from None
    except BaseException:
        if outputs:
            outputs.discard()
        raise
    if outputs:
        outputs.commit()
    return follow.lost


def device_node(dev_id: int) -> str:
    """Where a device's IO goes in: /dev/ublkbN, or a FUSE device's loop device or file."""
    from ..devices import fuse, registry
    from ..devices.ids import is_fuse

    if not is_fuse(dev_id):
        return f"/dev/ublkb{dev_id}"
    entry = registry.read(dev_id) or {}
    return entry.get("loop") or fuse.disk_path(dev_id)


def daemon_pid(dev_id: int) -> int:
    from ..devices import registry

    return int((registry.read(dev_id) or {}).get("pid") or 0)


def blkparse_text(dev_id: int) -> blktrace.TextFormat:
    """`trace --format blkparse` of a device: its device number and its daemon's pid."""
    return blktrace.TextFormat(*blktrace.device_number(device_node(dev_id)), daemon_pid(dev_id))


def refuse_unrecorded(dev_id: int, verb: str) -> None:
    """A device added with --no-records keeps no records: say so rather than wait forever."""
    from ..devices import registry
    from ..devices.ids import name

    spec = (registry.read(dev_id) or {}).get("spec")
    if isinstance(spec, dict) and spec.get("no_records"):
        raise UblkError(f"{verb}: device {name(dev_id)} was added with --no-records: it keeps no records")


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise UsageError(f"record: unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    return fmt
