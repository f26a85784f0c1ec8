"""`mark ID NAME`: a named point in a device's --log-writes log (what `dmsetup message DEV 0
mark NAME` is to the kernel's log-writes target), and the log's status for `info`.

The request goes through the device's shared memory (native/faults.h, struct us_lw_box): under
the file's flock, the name is written and mark_req bumped; the daemon's wait loop writes the
mark after everything logged so far and answers in mark_done. The flock is held until then,
so one mark is in the box at a time."""
from __future__ import annotations

import time

from .._native import ffi
from ..devices import ids as devids
from ..errors import UblkError, UsageError
from .logdevice import MAX_MARK, MARK_WAIT_MS, reason

# the daemon looks at the box a few times a second; it then waits up to MARK_WAIT_MS itself
WAIT_S = MARK_WAIT_MS / 1000 + 5


def check_name(name: str) -> bytes:
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise UsageError("mark: NAME holds a character that is not text (a lone surrogate)") from None
    if not raw:
        raise UsageError("mark: NAME is empty")
    if b"\0" in raw:
        raise UsageError("mark: NAME holds a NUL byte")
    if len(raw) > MAX_MARK:
        raise UsageError(f"mark: NAME is {len(raw)} bytes; a mark holds at most {MAX_MARK} "
                         "(it shares one 512-byte log sector with its entry header)")
    return raw


def run_mark(a: dict) -> dict:
    from ..faults import table

    dev_id = a["id"]
    name = devids.name(dev_id)
    raw = check_name(a["name"])
    with table.locked(dev_id) as s:
        box = s.fault_area().lw
        if not box.on:
            raise UblkError(f"device {name} keeps no write log (add it with --log-writes FILE)")
        if box.error:
            raise UblkError(f"device {name}: its write log stopped: "
                            f"{reason(int(box.error), int(box.limit))}")
        ffi.memmove(box.mark_name, raw + b"\0", len(raw) + 1)
        req = int(box.mark_req) + 1
        box.mark_req = req
        deadline = time.monotonic() + WAIT_S
        looked = time.monotonic()
        while int(box.mark_done) != req:
            now = time.monotonic()
            if now - looked > 0.5:
                looked = now
                if not _daemon_alive(dev_id):
                    raise UblkError(f"device {name}: its daemon is not running (see `ublkshell list`)")
            if now > deadline:
                raise UblkError(f"device {name}: the mark is not in the log after {WAIT_S:.0f} s: the "
                                "log's writer is behind (`info` shows what it holds); it goes in when "
                                "the writer gets there")
            time.sleep(0.01)
        if box.mark_err:
            raise UblkError(f"device {name}: the mark was not logged: "
                            f"{reason(int(box.mark_err), int(box.limit))}")
        return {"device": name, "mark": a["name"], "entry": int(box.mark_index),
                "entries": int(box.entries)}


def _daemon_alive(dev_id: int) -> bool:
    from .. import procs
    from ..devices import registry

    entry = registry.read(dev_id)
    return entry is not None and procs.entry_daemon_alive(entry)


def render_mark(r: dict) -> str:
    # a name is printed as typed, its control characters as escapes (never sent to the terminal)
    shown = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in r["mark"])
    return f"dev {r['device']}: mark '{shown}' is entry {r['entry']} of the log"


def device_status(dev_id: int) -> dict | None:
    """The write log's status for `info`, None where the device keeps none (or no statistics)."""
    from ..devices.paths import stats_path
    from ..observe.shm import Shm

    if not _daemon_alive(dev_id):
        return None   # what a dead daemon left in the box is not the log's state
    try:
        s = Shm(stats_path(dev_id))
    except (OSError, UblkError):
        return None
    try:
        return status(s.fault_area())
    finally:
        s.close()


def status(area) -> dict | None:
    """The log's status from a device's fault area, None if it keeps none."""
    if area == ffi.NULL or not area.lw.on:
        return None
    box = area.lw
    return {"entries": int(box.entries), "bytes": int(box.log_bytes), "held": int(box.held_bytes),
            "held_max": int(box.held_max), "memory": int(box.limit), "marks": int(box.marks),
            "error": reason(int(box.error), int(box.limit)) if box.error else None}


def status_line(path: str, st: dict | None) -> str:
    if st is None:
        return f"write log: {path} (no daemon has it open)"
    n = st["entries"]
    line = (f"write log: {path}: {n} entr{'y' if n == 1 else 'ies'}, {st['bytes'] >> 20} MiB, {st['marks']} marks; "
            f"{st['held'] >> 10} KiB held in memory (most {st['held_max'] >> 20} MiB of "
            f"{st['memory'] >> 20} MiB)")
    return line + (f"; STOPPED: {st['error']}" if st["error"] else "")

