"""`quiesce`, `resume` and `upgrade`: replace a device's daemon without failing an IO
(UBLK_U_CMD_QUIESCE_DEV, Linux 6.16+, on a device added with --recovery).

QUIESCE_DEV makes the kernel hold new IO and cancel the daemon's idle fetch commands; the
daemon goes on until every IO it holds is committed, then exits on its own, keeping the
device (devices/recovery.py's requeue path is for a daemon that dies holding IO). The device
is then QUIESCED: IO waits, as after a kill, but none was lost with the daemon. `resume`
(recover, for a quiesced device) starts a new daemon (START/END_USER_RECOVERY), and the waiting IO flows to it. `upgrade`
is both, so the new daemon runs whatever code is installed now."""
import errno
import time

from . import ids as devids, registry
from .. import procs
from .._native import lib
from ..errors import UblkError
from ..kernel.ctrl import Control, CtrlError
from ..kernel.uapi import STATES
from .recovery import _info, _serving, _ublk_only, recover

WAIT_S = 30.0
SETTLE_S = 4.0  # the daemon kicks the requeue list 0.2, 1 and 3 s after it took over
HANDOVER_TRIES = 3


def quiesce(dev_id: int, timeout: float = WAIT_S, withheld=None) -> dict:
    """Hold new IO, let the daemon finish what it holds and exit; the device stays QUIESCED.
    withheld(dev_id): how many IOs a hang rule holds now (the statistics know)."""
    _ublk_only(dev_id)
    name = devids.name(dev_id)
    with Control() as ctrl:
        if not ctrl.features & lib.UBLK_F_QUIESCE:
            raise UblkError("this kernel's ublk_drv cannot quiesce a device (no UBLK_F_QUIESCE, Linux 6.16+)")
        info = _info(ctrl, dev_id)
        if not info.flags & lib.UBLK_F_USER_RECOVERY:
            raise UblkError(f"device {name} was added without --recovery: the kernel holds IO for a new "
                            "daemon only on such a device")
        if not info.flags & lib.UBLK_F_QUIESCE:
            raise UblkError(f"device {name} was added without UBLK_F_QUIESCE (before ublkshell asked "
                            f"for it): `kill {name}` and `recover {name}` replace its daemon instead")
        if info.flags & lib.UBLK_F_BATCH_IO:
            # measured on Linux 7.3: IO dispatched while the queue cancels fails (EIO), whatever
            # the recovery mode, where the per-tag interface requeues it for the new daemon
            raise UblkError(f"device {name} uses batch IO, where the kernel fails the IO it queues "
                            "during QUIESCE_DEV: add it with --io-mode per-tag to upgrade it "
                            f"(`kill {name}` and `recover {name}` replace the daemon in any mode)")
        entry = registry.read(dev_id)
        if entry is None:
            raise UblkError(f"device {name} is not served by ublkshell")
        pid, start = _serving(info, entry)
        if not pid or info.state != lib.UBLK_S_DEV_LIVE:
            raise UblkError(f"device {name} has no live daemon ({STATES.get(info.state, info.state)}): "
                            f"nothing to quiesce (`recover {name}` serves it again)")
        hung = withheld(dev_id) if withheld else 0
        if hung:
            raise UblkError(f"device {name}: {hung} IO{'s are' if hung > 1 else ' is'} withheld by a hang "
                            f"rule, which the daemon would never finish: `clear {name}` first")
        # the server's watch must see an exit on purpose, not a crash to recover from
        registry.write(dev_id, dict(entry, quiesced_pid=pid, quiesced_at=time.time()))
        t0 = time.monotonic()
        try:
            ctrl.quiesce_dev(dev_id, int(timeout * 1000))
        except CtrlError as e:
            # no quiesce happened: a later death of this daemon is a crash again (auto-recover)
            registry.write(dev_id, entry)
            if e.errno == errno.EBUSY:
                raise UblkError(f"device {name}: its queues did not go idle within {timeout:g} s "
                                f"(IO held by a delay rule?); if its IO now waits, `recover {name}`") from None
            raise
        if not procs.wait_gone(pid, start, max(1.0, timeout - (time.monotonic() - t0)), interval=0.02):
            raise UblkError(f"device {name}: quiesced, but its daemon (pid {pid}) did not exit within "
                            f"{timeout:g} s (see {entry.get('log') or 'its log'})")
        state = int(ctrl.get_dev_info(dev_id).state)
    return {"device": name, "pid": pid, "state": STATES.get(state, str(state)),
            "seconds": round(time.monotonic() - t0, 3)}


def render_quiesce(r: dict) -> str:
    return (f"dev {r['device']}: daemon {r['pid']} finished its IO and left; device {r['state']}: "
            f"new IO waits until `resume {r['device']}`")


def resume(dev_id: int) -> dict:
    """The end of a `quiesce`: a new daemon serves the device and the IO that waited.

    `recover` does the same for any daemon that is gone; resume is for a device `quiesce` left,
    so that a typo'd id never starts a daemon on a device that died for a reason to look at
    first. Like upgrade, it checks that the waiting requests left the requeue list."""
    name = devids.name(dev_id)
    entry = registry.read(dev_id)
    if entry is None:
        raise UblkError(f"device {name} is not served by ublkshell")
    if not entry.get("quiesced_pid") or entry.get("quiesced_pid") != entry.get("pid"):
        raise UblkError(f"device {name} was not quiesced (`quiesce {name}` holds its IO; "
                        f"`recover {name}` serves a device whose daemon died)")
    dev = recover(dev_id)
    _flowing(dev_id)
    return dict(dev, requeued=requeued(dev_id))


def render_resume(r: dict) -> str:
    out = (f"dev {devids.name(r['id'])}: resumed by daemon {r['pid']} (was {r['old_pid']}), "
           f"the IO that waited goes on")
    if r["requeued"]:
        out += (f"; {r['requeued']} requests are still on the kernel's requeue list "
                f"(`upgrade {devids.name(r['id'])}` hands over again)")
    return out


def requeued(dev_id: int) -> int | None:
    """Requests on the device's requeue list (blk-mq debugfs), None where that is not mounted."""
    try:
        with open(f"/sys/kernel/debug/block/ublkb{dev_id}/requeue_list", "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return None


def _flowing(dev_id: int, wait: float = SETTLE_S) -> bool:
    """Whether the requeue list empties once a new daemon serves (the daemon kicks it too)."""
    deadline = time.monotonic() + wait
    while True:
        n = requeued(dev_id)
        if not n:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def upgrade(dev_id: int, timeout: float = WAIT_S, withheld=None) -> dict:
    """quiesce, then a new daemon (today's code) takes the device over.

    Measured on 7.3.4: about once in 40 hand-overs the requests that waited while the device
    was quiesced stayed on the block layer's requeue list, and kicking it did not always move
    them: their IO would wait forever. So the hand-over is checked, and done again (quiesce,
    recover: the kernel resets the queue's state on each recovery) until the list drains."""
    t0 = time.monotonic()
    retries = 0
    while True:
        q = quiesce(dev_id, timeout, withheld)
        try:
            dev = recover(dev_id)
        except UblkError as e:
            raise UblkError(f"device {q['device']} is QUIESCED and its IO waits: {e}; "
                            f"`recover {q['device']}` tries again") from None
        if _flowing(dev_id) or retries >= HANDOVER_TRIES:
            break
        retries += 1
    return {"device": q["device"], "old_pid": q["pid"], "pid": dev["pid"], "recoveries": dev["recoveries"],
            "quiesce_seconds": q["seconds"], "retries": retries, "requeued": requeued(dev_id),
            "seconds": round(time.monotonic() - t0, 3)}


def render_upgrade(r: dict) -> str:
    out = (f"dev {r['device']}: daemon {r['old_pid']} replaced by {r['pid']} in {r['seconds']:.2f} s; "
           f"the old one finished its IO in {r['quiesce_seconds']:.2f} s, new IO waited for the new one")
    if r["retries"]:
        out += f" (handed over {r['retries'] + 1} times: the kernel left requests requeued)"
    if r["requeued"]:
        out += f"; {r['requeued']} requests are still on the requeue list"
    return out
