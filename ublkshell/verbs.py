"""The verb table every face calls (CLI, server, REPL): `run_X(args) -> result` does
the work and returns plain JSON-able data; each verb names the renderer
(observe/render.py) that turns that into text for people. `--json` prints the
result itself."""
import json
from typing import Any, Callable, NamedTuple

from .devices import ids as devids
from .errors import UsageError
from .devices.io_modes import MAX_COALESCE_NS
from .observe.names import MAX_DEPTH, US_ZONES_MAX
from .observe.render import (render_add, render_del, render_features, render_inflight, render_lat,
                             render_list, render_stats, zoned_line)
from .validate import ID, JSON, Arg, check, dev_ids, duration, flag, text, text_or_flag, whole, words


# -- devices --------------------------------------------------------------
def run_add(a: dict) -> dict:
    from .devices.lifecycle import add
    from .devices.targets import build_spec

    spec = build_spec(a["target"], file=a["file"], size=a["size"], queues=a["queues"], depth=a["depth"],
                      block_size=a["block_size"], max_io=a["max_io"], dev_id=a["dev_id"],
                      transport=a["transport"], loop=a["loop"], powercut=a["powercut"],
                      no_records=a["no_records"], recovery=a["recovery"], io_mode=a["io_mode"],
                      coalesce_ns=a["coalesce"], zero_copy=a["zero_copy"], zoned=a["zoned"],
                      zone_size=a["zone_size"], conv_zones=a["conv_zones"], max_open=a["max_open"],
                      max_active=a["max_active"])
    if a["log_writes"] is not None or a["log_writes_memory"] is not None:
        from .crash.logdevice import check_spec

        spec["log_writes"] = check_spec(a["log_writes"], a["log_writes_memory"], spec.get("zoned"))
    return add(spec)


ADD_ARGS = {
    "target": Arg("-t/--type", text(64), required=True),
    "file": Arg("-f/--file", text()),
    "size": Arg("--size", text(64)),
    "queues": Arg("-q/--queues", whole(1, 64), 1),
    "depth": Arg("-d/--depth", whole(1, MAX_DEPTH), 128),
    "dev_id": Arg("-n/--number", whole(-1, devids.FUSE_BASE - 1), -1),
    "block_size": Arg("--block-size", text(64)),
    "max_io": Arg("--max-io", text(64), "512k"),
    "transport": Arg("--transport", text(64), "ublk"),
    "loop": Arg("--loop", flag, False),
    "powercut": Arg("--powercut", flag, False),
    "no_records": Arg("--no-records", flag, False),
    "recovery": Arg("--recovery", text_or_flag()),
    "io_mode": Arg("--io-mode", text(64), "auto"),
    "coalesce": Arg("--coalesce", duration("us", hi=MAX_COALESCE_NS), 0),
    "zero_copy": Arg("--zero-copy", text(64), "auto"),
    "zoned": Arg("--zoned", flag, False),
    "zone_size": Arg("--zone-size", text(64)),
    "conv_zones": Arg("--conv-zones", whole(0, US_ZONES_MAX - 1)),
    "max_open": Arg("--max-open", whole(1, US_ZONES_MAX)),
    "max_active": Arg("--max-active", whole(1, US_ZONES_MAX)),
    "log_writes": Arg("--log-writes", text()),
    "log_writes_memory": Arg("--log-writes-memory", text(64)),
    **JSON,
}


def run_del(a: dict) -> dict:
    from .devices.lifecycle import delete, delete_all

    ids = a["ids"]
    if a["all"]:
        if ids:
            raise UsageError("del: give device ids or -a, not both")
        return {"deleted": [devids.name(i) for i in delete_all()], "all": True}
    if not ids:
        raise UsageError("del: which device? give an id (see `ublkshell list`) or -a for all")
    for dev_id in ids:
        delete(dev_id)
    return {"deleted": [devids.name(i) for i in ids], "all": False}


def run_list(a: dict) -> list:
    from .devices.lifecycle import list_devices

    return list_devices()


def run_features(a: dict) -> dict:
    from .devices.lifecycle import features
    from .kernel.uapi import FEATURES

    mask = features()
    return {"mask": mask, "features": {n: bool(mask & b) for n, b in FEATURES.items()}}


# -- observation ----------------------------------------------------------
def run_stats(a: dict) -> dict:
    from .observe.shm import open_device
    from .observe.stats import stats_of

    return stats_of(a["id"], open_device(a["id"]), histograms=a.get("histograms", False))


def run_info(a: dict) -> dict:
    """A device's `list` entry and its stats: what one needs to know of it, in one call."""
    from .devices.lifecycle import list_devices
    from .errors import UblkError

    dev_id = a["id"]
    entry = next((d for d in list_devices() if d["id"] == dev_id), None)
    try:
        stats, error = run_stats({"id": dev_id, "histograms": False}), None
    except UblkError as e:
        if entry is None:
            raise
        stats, error = None, str(e)
    if entry is None:
        # statistics without a device: its daemon kept them after the device went
        error = f"device {devids.name(dev_id)} is not among the kernel's devices"
    r = {"device": devids.name(dev_id), "list": entry, "stats": stats, "error": error}
    from .devices import registry

    log = ((registry.read(dev_id) or {}).get("spec") or {}).get("log_writes")
    if isinstance(log, dict):
        from .crash.marks import device_status

        r["log_writes"] = dict(path=str(log.get("path")), status=device_status(dev_id))
    return r


def render_info(r: dict) -> str:
    out = [render_list([r["list"]])] if r["list"] else []
    if r["list"] and r["list"].get("zoned"):
        out.append(zoned_line(r["list"]["zoned"]))
    if r.get("log_writes"):
        from .crash.marks import status_line

        out.append(status_line(r["log_writes"]["path"], r["log_writes"]["status"]))
    if r["stats"]:
        out.append(render_stats(r["stats"]))
    if r["error"]:
        out.append(r["error"])
    return "\n".join(out)


def run_lat(a: dict) -> dict:
    from .observe.names import OPS
    from .observe.objects import lat
    from .observe.shm import open_device

    dev_id, op = a["id"], a["op"]
    if op not in OPS:
        raise UsageError(f"lat: unknown op {op!r} (choose from {', '.join(OPS)})")
    return lat(dev_id, open_device(dev_id), op)


def run_inflight(a: dict) -> dict:
    from .observe.objects import inflight
    from .observe.shm import open_device

    return inflight(a["id"], open_device(a["id"]))


TRACE_ARGS = {**ID, "filters": Arg("FILTER", words(), ()), "from_start": Arg("--from-start", flag, False),
              "count": Arg("--count", whole(0, 1 << 31), 0), "duration": Arg("--duration", duration(default_unit="s"), 0),
              "format": Arg("--format", text(32)), **JSON}
STATS_INTERVAL_ARGS = {**ID, "interval": Arg("--interval", duration(default_unit="s", lo=1_000_000), required=True),
                       "count": Arg("--count", whole(0, 1 << 31), 0), "queues": Arg("--queues", flag, False), **JSON}
TOP_ARGS = {"ids": Arg("ID", dev_ids, ()),
            "interval": Arg("--interval", duration(default_unit="s", lo=10**7, hi=86400 * 10**9), 10**9),
            "count": Arg("--count", whole(0, 1 << 31), 0), "batch": Arg("-b/--batch", flag, False)}
RECORD_ARGS = {**TRACE_ARGS, "format": Arg("--format", text(32), "blktrace"),
               "output": Arg("-o/--output", text(4096), required=True), "force": Arg("--force", flag, False)}

def run_metrics(a: dict) -> dict:
    from .devices import registry
    from .errors import UblkError
    from .observe.metrics import exposition
    from .observe.shm import open_device

    fmt = a["format"]
    if fmt not in METRICS_FORMATS:
        raise UsageError(f"metrics: unknown format {fmt!r} (choose from {', '.join(METRICS_FORMATS)})")

    def shm_of(dev_id):
        try:
            return open_device(dev_id)
        except UblkError:
            return None
    return {"format": fmt, "text": exposition(registry.all_entries(), shm_of, openmetrics=fmt == "openmetrics")}


def render_metrics(r: dict) -> str:
    return r["text"].rstrip("\n")


METRICS_FORMATS = ("prometheus", "openmetrics")


class Verb(NamedTuple):
    run: Callable[[dict], Any]
    render: Callable[..., str]
    args: dict  # name -> validate.Arg: what the verb takes, checked by call()


# the one-shot verbs
VERBS = {
    "add": Verb(run_add, render_add, ADD_ARGS),
    "del": Verb(run_del, render_del, {"ids": Arg("ID", dev_ids, ()), "all": Arg("-a/--all", flag, False), **JSON}),
    "list": Verb(run_list, render_list, JSON),
    "features": Verb(run_features, render_features, JSON),
    "stats": Verb(run_stats, render_stats, {**ID, "queues": Arg("--queues", flag, False),
                                            "histograms": Arg("--histograms", flag, False), **JSON}),
    "info": Verb(run_info, render_info, {**ID, **JSON}),
    "lat": Verb(run_lat, render_lat, {**ID, "op": Arg("OP", text(32), "read"), **JSON}),
    "inflight": Verb(run_inflight, render_inflight, {**ID, **JSON}),
    "metrics": Verb(run_metrics, render_metrics, {"format": Arg("--format", text(32), "prometheus"), **JSON}),
}

# the fault verbs (delay, fail, ..., faults, clear, seed) live with the rule engine
from .faults.verbs import VERBS as _FAULT_VERBS  # noqa: E402

VERBS.update({name: Verb(*v) for name, v in _FAULT_VERBS.items()})


# -- live changes ----------------------------------------------------------------
def run_resize(a: dict) -> dict:
    from .devices.resize import resize

    return resize(a["id"], a["size"], a["force"])


def render_resize(r: dict) -> str:
    from .devices.resize import render_resize as render

    return render(r)


VERBS["resize"] = Verb(run_resize, render_resize, {**ID, "size": Arg("SIZE", text(64), required=True),
                                                   "force": Arg("--force", flag, False), **JSON})


def _hung_tags(dev_id: int) -> int:
    """IOs a hang rule withholds now (a daemon would hold them forever): the fault area's count,
    the one `faults` shows."""
    from .errors import UblkError
    from .faults import table

    try:
        return table.rules(dev_id)["hung"]
    except UblkError:
        return 0


def run_quiesce(a: dict) -> dict:
    from .devices.upgrade import quiesce

    return quiesce(a["id"], a["timeout"] / 1e9, withheld=_hung_tags)


def run_upgrade(a: dict) -> dict:
    from .devices.upgrade import upgrade

    return upgrade(a["id"], a["timeout"] / 1e9, withheld=_hung_tags)


def render_quiesce(r: dict) -> str:
    from .devices.upgrade import render_quiesce as render

    return render(r)


def render_upgrade(r: dict) -> str:
    from .devices.upgrade import render_upgrade as render

    return render(r)


def run_resume(a: dict) -> dict:
    from .devices.upgrade import resume

    return resume(a["id"])


def render_resume(r: dict) -> str:
    from .devices.upgrade import render_resume as render

    return render(r)


_HANDOVER_ARGS = {**ID, "timeout": Arg("--timeout", duration(default_unit="s", lo=10**8, hi=3600 * 10**9),
                                       30 * 10**9), **JSON}
VERBS["quiesce"] = Verb(run_quiesce, render_quiesce, _HANDOVER_ARGS)
VERBS["upgrade"] = Verb(run_upgrade, render_upgrade, _HANDOVER_ARGS)
VERBS["resume"] = Verb(run_resume, render_resume, {**ID, **JSON})


# -- the write log (add --log-writes): marks -------------------------------------
def run_mark(a: dict) -> dict:
    from .crash.marks import run_mark as run

    return run(a)


def render_mark(r: dict) -> str:
    from .crash.marks import render_mark as render

    return render(r)


VERBS["mark"] = Verb(run_mark, render_mark, {**ID, "name": Arg("NAME", text(), required=True), **JSON})


# -- daemon death and recovery (kill, recover) ---------------------------------
def run_kill(a: dict) -> dict:
    from .devices.recovery import kill

    return kill(a["id"])


def run_recover(a: dict) -> dict:
    from .devices.recovery import recover

    return recover(a["id"])


def render_kill(r: dict) -> str:
    from .devices.recovery import render_kill as render

    return render(r)


def render_recover(r: dict) -> str:
    from .devices.recovery import render_recover as render

    return render(r)


VERBS.update({"kill": Verb(run_kill, render_kill, {**ID, **JSON}),
              "recover": Verb(run_recover, render_recover, {**ID, **JSON})})
# -- end daemon death and recovery ---------------------------------------------


def call(name: str, args) -> Any:
    """Run a verb with arguments from any face: checked first (validate.py), then run."""
    verb = VERBS.get(name)
    if verb is None:
        raise UsageError(f"unknown command {str(name)[:40]!r}")
    return verb.run(check(name, verb.args, args))


def dumps(result) -> str:
    return json.dumps(result, sort_keys=True)
