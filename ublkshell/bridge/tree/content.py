"""What the stats tree's files hold: one function per file, text for people and a .json
twin for scripts, each built from the device's registry entry and shared memory with the
renderers every face shares (observe/render.py). Also what a line written to `faults` does."""
import json
from typing import Protocol

from ... import procs
from ...devices.ids import name as dev_name, stem
from ...devices.io_modes import io_mode_of, zero_copy_of
from ...errors import UsageError
from ...kernel.uapi import feature_names
from ...observe import objects
from ...observe.names import OPS
from ...observe.shm import Shm
from ...observe.render import hist_bars, inflight_table, pow2_hist, ring_line, stats_table, tags_table
from ...observe.stats import fmt_ns, stats_of
from ...units import human

FAULTS_HELP = ("# one rule per line, e.g. `delay 5ms op=write`, `fail lba 2048..4095 op=read`;\n"
               "# `clear`, `clear ID`, `seed N`. Grammar: docs/faults.md\n")


class DeviceSource(Protocol):
    def devices(self) -> dict[int, dict]: ...

    def shm(self, dev_id: int) -> Shm | None: ...


def _dump(obj) -> str:
    return json.dumps(obj, sort_keys=True) + "\n"


class Gone(Exception):
    """The device (or its statistics) went away while we looked."""


def _info(dev, entry, s):
    pid = entry.get("pid")
    flags = int(entry.get("flags") or 0)
    fuse = entry.get("transport") == "fuse"
    return {"id": dev, "name": dev_name(dev), "transport": "fuse" if fuse else "ublk",
            "target": entry.get("target"), "describe": entry.get("describe"),
            "size": entry.get("size"), "block_size": entry.get("block_size"),
            "queues": entry.get("queues"), "depth": entry.get("depth"),
            "pid": pid, "daemon_alive": procs.entry_daemon_alive(entry),
            "flags": flags, "flag_names": feature_names(flags),
            "recovery": entry.get("recovery"), "recoveries": entry.get("recoveries", 0),
            "io_mode": entry.get("io_mode") or (io_mode_of(flags) if not fuse else None),
            "zero_copy": zero_copy_of(flags),
            "file": entry.get("file") if fuse else None, "mount": entry.get("mount") if fuse else None,
            "loop": entry.get("loop") if fuse else None}


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
            + (f"io mode     {i['io_mode']}{', zero copy' if i['zero_copy'] else ''}\n" if i["io_mode"] else "")
            + f"daemon      pid {i['pid']} ({'alive' if i['daemon_alive'] else 'dead'})\n"
            f"flags       {i['flags']:#x} {names}\n"
            + f"recovery    {i['recovery'] or 'none'}"
              f"{', recovered ' + str(i['recoveries']) + ' times' if i['recoveries'] else ''}\n"
            + (f"transport   fuse: file {i['file']}, block device {i['loop'] or '-'}\n"
               if i["transport"] == "fuse" else ""))


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
    return (stats_table(f"{stem(dev)}: {r['inflight']} in flight", [("", r["ops"])], all_ops=True) + "\n"
            + ring_line("ring", r["ring"]) + "\n")


def stats_json(dev, entry, s):
    return _dump(stats_of(dev, _need(s)))


def latency_text(dev, entry, s):
    ops = objects.latency(dev, _need(s))["ops"]
    out = []
    for name in OPS:
        lat = ops[name]
        if not lat["ios"]:
            continue
        out.append(f"{name}: {lat['ios']} IOs, avg {fmt_ns(lat['avg_ns'])}, p50 {fmt_ns(lat['p50_ns'])}, "
                   f"p90 {fmt_ns(lat['p90_ns'])}, p99 {fmt_ns(lat['p99_ns'])}, "
                   f"p99.9 {fmt_ns(lat['p999_ns'])}, max {fmt_ns(lat['max_ns'])}")
        out += hist_bars(pow2_hist((b["low_ns"], b["count"]) for b in lat["buckets"]), 40, indent="  ")
    if not out:
        out.append(f"{stem(dev)}: no IO yet")
    return "\n".join(out) + "\n"


def latency_json(dev, entry, s):
    return _dump(objects.latency(dev, _need(s)))


def inflight_text(dev, entry, s):
    return inflight_table(stem(dev), objects.inflight(dev, _need(s))) + "\n"


def inflight_json(dev, entry, s):
    return _dump(objects.inflight(dev, _need(s)))


def _faults(dev, s):
    from ...faults.table import read_shm
    from ...faults.verbs import faults_result

    return faults_result(dev, read_shm(_need(s)))


def faults_text(dev, entry, s):
    from ...faults.verbs import rules_table

    return FAULTS_HELP + rules_table(_faults(dev, s)) + "\n"


def faults_json(dev, entry, s):
    return _dump(_faults(dev, s))


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


def _queue_stats(dev, s, q):
    # the queue's entry of `stats --json`: one object, whichever face shows it
    queues = stats_of(dev, _need(s))["queues"]
    if q >= len(queues):
        raise Gone
    return queues[q]


def q_stats_text(dev, entry, s, q):
    qs = _queue_stats(dev, s, q)
    return (stats_table(f"{stem(dev)} queue {q}: {qs['inflight']} in flight", [("", qs["ops"])], all_ops=True)
            + "\n" + ring_line("ring", qs["ring"]) + "\n")


def q_stats_json(dev, entry, s, q):
    return _dump(_queue_stats(dev, s, q))


def q_inflight_text(dev, entry, s, q):
    return tags_table(f"{stem(dev)} queue {q}", objects.inflight(dev, _need(s), q)["tags"]) + "\n"


def q_inflight_json(dev, entry, s, q):
    return _dump(objects.inflight(dev, _need(s), q))


# kinds: "snap" (generated per open), "trace" (stream; its last field: the lines' format),
# "faults" (rules, writable). Every file has a .json twin with the same numbers (docs/schema.md).
DEV_FILES = [("info", "snap", 0o444, info_text), ("info.json", "snap", 0o444, info_json),
             ("params", "snap", 0o444, params_text), ("params.json", "snap", 0o444, params_json),
             ("stats", "snap", 0o444, stats_text), ("stats.json", "snap", 0o444, stats_json),
             ("latency", "snap", 0o444, latency_text), ("latency.json", "snap", 0o444, latency_json),
             ("inflight", "snap", 0o444, inflight_text), ("inflight.json", "snap", 0o444, inflight_json),
             ("trace", "trace", 0o444, "text"), ("trace.json", "trace", 0o444, "json"),
             ("faults", "faults", 0o600, faults_text), ("faults.json", "snap", 0o444, faults_json)]
Q_FILES = [("stats", "snap", 0o444, q_stats_text), ("stats.json", "snap", 0o444, q_stats_json),
           ("inflight", "snap", 0o444, q_inflight_text), ("inflight.json", "snap", 0o444, q_inflight_json)]
def metrics_text(devices: dict, shm_of) -> str:
    from ...observe.metrics import exposition

    return exposition(devices, shm_of)


# the tree's own files, beside the device directories: (name, kind, mode, gen(devices, shm_of))
ROOT_FILES = [("metrics", "snap", 0o444, metrics_text)]
ROOT_BY_NAME = {name.encode(): i for i, (name, *_rest) in enumerate(ROOT_FILES)}
DEV_BY_NAME = {name.encode(): i + 1 for i, (name, *_rest) in enumerate(DEV_FILES)}
Q_BY_NAME = {name.encode(): i + 1 for i, (name, *_rest) in enumerate(Q_FILES)}
