"""The verbs every face shares (CLI, server, REPL): `run_X(args) -> result` does
the work and returns plain JSON-able data; `render_X(result) -> str` turns it
into text for people. `--json` prints the result itself."""
import json
from typing import Any, Callable, NamedTuple

from .devices import ids as devids
from .errors import UsageError
from .units import human
from .validate import ID, JSON, Arg, check, dev_ids, flag, text, text_or_flag, whole, words


# -- devices --------------------------------------------------------------
def run_add(a: dict) -> dict:
    from .devices.lifecycle import add
    from .devices.targets import build_spec

    spec = build_spec(a["target"], file=a["file"], size=a["size"], queues=a["queues"], depth=a["depth"],
                      block_size=a["block_size"], max_io=a["max_io"], dev_id=a["dev_id"],
                      transport=a["transport"], loop=a["loop"], powercut=a["powercut"],
                      no_records=a["no_records"], recovery=a["recovery"])
    return add(spec)


ADD_ARGS = {
    "target": Arg("-t/--type", text(64), required=True),
    "file": Arg("-f/--file", text()),
    "size": Arg("--size", text(64)),
    "queues": Arg("-q/--queues", whole(1, 64), 1),
    "depth": Arg("-d/--depth", whole(1, 4096), 128),
    "dev_id": Arg("-n/--number", whole(-1, devids.FUSE_BASE - 1), -1),
    "block_size": Arg("--block-size", text(64)),
    "max_io": Arg("--max-io", text(64), "512k"),
    "transport": Arg("--transport", text(64), "ublk"),
    "loop": Arg("--loop", flag, False),
    "powercut": Arg("--powercut", flag, False),
    "no_records": Arg("--no-records", flag, False),
    "recovery": Arg("--recovery", text_or_flag()),
    **JSON,
}


def render_add(dev: dict) -> str:
    if dev.get("transport") == "fuse":
        return render_add_fuse(dev)
    q = dev["queues"]
    return (f"dev {dev['id']} -> /dev/ublkb{dev['id']} ({dev['describe']}, {human(dev['size'])}, "
            f"{q} queue{'s' if q > 1 else ''} x {dev['depth']}"
            + (f", recovery {dev['recovery']}" if dev.get("recovery") else "") + ")")


def render_add_fuse(dev: dict) -> str:
    what = f"{dev['describe']}, {human(dev['size'])}"
    if dev.get("loop"):
        return f"dev {dev['name']} -> {dev['loop']} ({what}, FUSE file {dev['file']})"
    return f"dev {dev['name']} -> {dev['file']} ({what}, FUSE file; `losetup` it, or add with --loop)"


def run_del(a: dict) -> dict:
    from .devices.lifecycle import delete, delete_all

    ids = a["ids"]
    if a["all"]:
        if ids:
            raise UsageError("del: give device ids or -a, not both")
        return {"deleted": delete_all(), "all": True}
    if not ids:
        raise UsageError("del: which device? give an id (see `ublkshell list`) or -a for all")
    for dev_id in ids:
        delete(dev_id)
    return {"deleted": ids, "all": False}


def render_del(r: dict) -> str:
    if r["all"]:
        n = len(r["deleted"])
        return f"deleted {n} device{'s' if n != 1 else ''}"
    return "\n".join(f"dev {devids.name(i)} deleted" for i in r["deleted"])


def run_list(a: dict) -> list:
    from .devices.lifecycle import list_devices

    return list_devices()


def render_list(devs: list) -> str:
    if not devs:
        return "no ublk devices"
    fuse = [d for d in devs if d.get("transport") == "fuse"]
    devs = [d for d in devs if d.get("transport") != "fuse"]
    if not devs:
        return render_fuse_list(fuse)
    lines = [f"{'ID':>3} {'STATE':<8} {'SIZE':>7} {'Q x D':>9} {'PID':>7}  {'TARGET':<28} FEATURES"]
    for d in devs:
        pid = str(d["pid"]) if d["daemon_alive"] else f"{d['pid']}†" if d["pid"] > 0 else "-"
        size = human(d["size"]) if d["size"] is not None else "?"
        lines.append(f"{d['id']:>3} {d['state']:<8} {size:>7} {str(d['queues']) + ' x ' + str(d['depth']):>9} "
                     f"{pid:>7}  {d['target']:<28} {','.join(d['flags']) or '-'}")
    lines += dead_daemon_notes(devs)
    return "\n".join(lines + ([render_fuse_list(fuse)] if fuse else []))


def render_fuse_list(devs: list) -> str:
    """FUSE-transport devices: their block device (with --loop) and file instead of ublk features."""
    lines = [f"{'ID':<7} {'STATE':<5} {'SIZE':>7} {'Q x D':>9} {'PID':>7}  {'TARGET':<28} {'BLOCK DEV':<12} FILE"]
    for d in devs:
        pid = str(d["pid"]) if d["daemon_alive"] else f"{d['pid']}†"
        size = human(d["size"]) if d["size"] is not None else "?"
        lines.append(f"{d['name']:<7} {d['state']:<5} {size:>7} {str(d['queues']) + ' x ' + str(d['depth']):>9} "
                     f"{pid:>7}  {d['target']:<28} {d['loop'] or '-':<12} {d['file']}")
    if any(not d["daemon_alive"] for d in devs):
        lines.append("† daemon gone: its mount and loop device are cleaned up; "
                     "the stats stay until `ublkshell del fuseN`")
    return "\n".join(lines)


def dead_daemon_notes(devs: list) -> list:
    """What a † in `list` means for each device without a daemon, by the kernel's state."""
    notes = {
        "QUIESCED": "IO waits until `recover ID` starts a new daemon (or `del ID` fails it)",
        "FAIL_IO": "IO fails (EREMOTEIO) until `recover ID` starts a new daemon",
    }
    out = []
    for d in devs:
        if not d["daemon_alive"]:
            what = notes.get(d["state"], "IO fails until the device is deleted (`ublkshell del ID`)")
            out.append(f"† dev {d['id']}: daemon gone ({d['state']}): {what.replace('ID', str(d['id']))}")
    return out


def run_features(a: dict) -> dict:
    from .devices.lifecycle import features
    from .kernel.uapi import FEATURES

    mask = features()
    return {"mask": mask, "features": {n: bool(mask & b) for n, b in FEATURES.items()}}


def render_features(r: dict) -> str:
    from .kernel.uapi import FEATURE_HELP

    lines = [f"ublk_drv features 0x{r['mask']:x}"]
    for name, on in r["features"].items():
        lines.append(f"  {'yes' if on else ' no'}  {name:<24} {FEATURE_HELP[name]}")
    return "\n".join(lines)


# -- observation ----------------------------------------------------------
def stats_of(dev_id: int, shm) -> dict:
    """Summaries per op, for the device and for each queue (the `stats --json` shape)."""
    from .observe.stats import snapshot, summarize

    snap = snapshot(shm)
    return {"device": dev_id, "inflight": snap["inflight"],
            "ops": {n: summarize(o) for n, o in snap["ops"].items()},
            "queues": [{"queue": q["queue"], "inflight": q["inflight"],
                        "ops": {n: summarize(o) for n, o in q["ops"].items()}} for q in snap["queues"]]}


def run_stats(a: dict) -> dict:
    from .observe.shm import open_device

    return stats_of(a["id"], open_device(a["id"]))


def stats_table(title: str, rows: list, all_ops: bool = False) -> str:
    """rows: (label prefix, {op: summary}); ops without IO are left out unless all_ops."""
    from .observe.names import OPS
    from .observe.stats import fmt_ns

    lines = [title, f"{'OP':<13}{'IOS':>10}{'BYTES':>10}{'ERRORS':>8}{'AVG':>9}{'P50':>9}{'P99':>9}{'MAX':>9}"]
    for prefix, ops in rows:
        for name in OPS:
            o = ops[name]
            if o["ios"] or all_ops:
                lines.append(f"{prefix + name:<13}{o['ios']:>10}{human(o['bytes']):>10}{o['errors']:>8}"
                             f"{fmt_ns(o['avg_ns']):>9}{fmt_ns(o['p50_ns']):>9}{fmt_ns(o['p99_ns']):>9}"
                             f"{fmt_ns(o['max_ns']):>9}")
    return "\n".join(lines)


def render_stats(r: dict, queues: bool = False) -> str:
    rows = [("", r["ops"])]
    if queues:
        rows += [(f"q{q['queue']} ", q["ops"]) for q in r["queues"]]
    return stats_table(f"dev {devids.name(r['device'])}: {r['inflight']} in flight", rows)


def run_lat(a: dict) -> dict:
    from ._native import lib
    from .observe.names import OPS
    from .observe.shm import open_device
    from .observe.stats import snapshot, summarize

    dev_id, op = a["id"], a["op"]
    if op not in OPS:
        raise UsageError(f"lat: unknown op {op!r} (choose from {', '.join(OPS)})")
    o = snapshot(open_device(dev_id))["ops"][op]
    buckets = [{"low_ns": lib.us_hist_low(i), "count": n} for i, n in enumerate(o["hist"]) if n]
    return {"device": dev_id, "op": op, **summarize(o), "buckets": buckets}


def render_lat(r: dict) -> str:
    from .observe.stats import fmt_ns

    if not r["ios"]:
        return f"dev {devids.name(r['device'])}: no {r['op']} IO yet"
    lines = [f"dev {devids.name(r['device'])} {r['op']}: {r['ios']} IOs, avg {fmt_ns(r['avg_ns'])}, "
             f"p50 {fmt_ns(r['p50_ns'])}, p99 {fmt_ns(r['p99_ns'])}, p99.9 {fmt_ns(r['p999_ns'])}, "
             f"max {fmt_ns(r['max_ns'])}"]
    return "\n".join(lines + hist_bars(pow2_hist((b["low_ns"], b["count"]) for b in r["buckets"]), 50))


def pow2_hist(buckets) -> list:
    """(low_ns, count) pairs of the ~3% buckets regrouped by power of two: a picture that fits a screen."""
    rows = {}
    for low, n in buckets:
        if n:
            key = 1 << (low.bit_length() - 1) if low else 0
            rows[key] = rows.get(key, 0) + n
    return [{"low_ns": low, "high_ns": max(1, low * 2), "count": rows[low]} for low in sorted(rows)]


def hist_bars(rows: list, width: int, indent: str = "") -> list:
    from .observe.stats import fmt_ns

    peak = max((b["count"] for b in rows), default=1)
    return [f"{indent}{fmt_ns(b['low_ns']):>8} .. {fmt_ns(b['high_ns']):<8} {b['count']:>9} "
            f"{'#' * max(1, round(width * b['count'] / peak))}" for b in rows]


def run_inflight(a: dict) -> dict:
    from .observe.shm import open_device
    from .observe.stats import inflight

    return {"device": a["id"], "tags": inflight(open_device(a["id"]))}


def tags_table(title: str, tags: list) -> str:
    from .observe.stats import fmt_ns

    if not tags:
        return f"{title}: nothing in flight"
    from .observe.names import fault_label

    lines = [f"{'Q':>3} {'TAG':>5} {'OP':<13} {'SECTOR+N':<20} {'AGE':>9} FAULT"]
    for t in sorted(tags, key=lambda t: -t["age_ns"]):
        lines.append(f"{t['queue']:>3} {t['tag']:>5} {t['op']:<13} "
                     f"{str(t['sector']) + '+' + str(t['sectors']):<20} {fmt_ns(t['age_ns']):>9} "
                     f"{fault_label(t.get('fault', 0)) or '-'}".rstrip())
    return "\n".join(lines)


def render_inflight(r: dict) -> str:
    return tags_table(f"dev {devids.name(r['device'])}", r["tags"])


TRACE_ARGS = {**ID, "filters": Arg("FILTER", words(), ()), "from_start": Arg("--from-start", flag, False),
              "count": Arg("--count", whole(0, 1 << 31), 0), "duration": Arg("--duration", text(64)),
              **JSON}

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
    "stats": Verb(run_stats, render_stats, {**ID, "queues": Arg("--queues", flag, False), **JSON}),
    "lat": Verb(run_lat, render_lat, {**ID, "op": Arg("OP", text(32), "read"), **JSON}),
    "inflight": Verb(run_inflight, render_inflight, {**ID, **JSON}),
}

# the fault verbs (delay, fail, ..., faults, clear, seed) live with the rule engine
from .faults.verbs import VERBS as _FAULT_VERBS  # noqa: E402

VERBS.update({name: Verb(*v) for name, v in _FAULT_VERBS.items()})


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
