"""The observation objects more than one face shows, each built by one function here: the
verbs (`lat`, `inflight`; verbs.py) and the stats tree's twins (bridge/tree/content.py)
call the same ones, so `lat 0 write --json` and `latency.json`'s write are one object.
Their shapes are observe/schema.py's kinds of the same names."""
from ..devices.ids import is_fuse, name as dev_name
from .names import OPS
from .shm import Shm
from .stats import buckets, inflight as tags_in_flight, snapshot, summarize


def latency_op(op: dict) -> dict:
    """One op of a snapshot: counters, percentiles and every non-empty bucket (kind latency_op)."""
    return {**summarize(op), "buckets": buckets(op["hist"])}


def lat(dev_id: int, s: Shm, op: str) -> dict:
    """`lat ID OP --json` (kind lat)."""
    return {"device": dev_name(dev_id), "op": op, **latency_op(snapshot(s)["ops"][op])}


def latency(dev_id: int, s: Shm) -> dict:
    """The tree's latency.json (kind latency): every op as `lat` shows it."""
    ops = snapshot(s)["ops"]
    return {"device": dev_name(dev_id), "ops": {n: latency_op(ops[n]) for n in OPS}}


def inflight(dev_id: int, s: Shm, queue: int | None = None) -> dict:
    """`inflight ID --json` and inflight.json (kind inflight), or one queue's (queue_inflight):
    oldest first, as the text shows them."""
    tags = tags_in_flight(s)
    if queue is not None:
        tags = [t for t in tags if t["queue"] == queue]
    tags.sort(key=lambda t: -t["age_ns"])
    out = {"device": dev_name(dev_id), "tags": tags}
    if queue is not None:
        out["queue"] = queue
    else:
        out["waiting"] = waiting_in_kernel(dev_id, len(tags))
    return out


def waiting_in_kernel(dev_id: int, held: int) -> int | None:
    """IOs the block layer has begun beyond the tags the daemon holds: the IO a quiesced device
    (or one whose daemon died, with --recovery) keeps waiting for a daemon. From the in-flight
    field of /sys/block/ublkbN/stat, which 7.3 counts from submission (its `inflight` file
    counts only what reached the driver, and misses exactly this IO; kernels whose stat counts
    the same way show 0 here). None where there is no ublk block device to ask (FUSE, gone)."""
    if is_fuse(dev_id):
        return None
    try:
        with open(f"/sys/block/ublkb{int(dev_id)}/stat", "rb") as f:
            in_flight = int(f.read().split()[8])
    except (OSError, ValueError, IndexError):
        return None
    return max(0, in_flight - held)


def trace_note(device: str, lost: int = 0) -> dict:
    """A line of trace.json that is no record: records lost, or the statistics restarted."""
    return {"device": device, "lost": lost} if lost else {"device": device, "restarted": True}
