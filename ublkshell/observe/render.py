"""The text every face shows for a verb's result (the CLI, the shell, the stats tree):
`render_X(result) -> str` over the plain data `verbs.run_X` returns, and the tables
and histogram bars those are built from."""
from ..devices import ids as devids
from ..kernel.uapi import FEATURE_HELP
from ..units import human
from .names import OPS
from .stats import fmt_ns


def render_add(dev: dict) -> str:
    if dev.get("transport") == "fuse":
        return render_add_fuse(dev)
    q = dev["queues"]
    return (f"dev {dev['id']} -> /dev/ublkb{dev['id']} ({dev['describe']}, {human(dev['size'])}, "
            f"{q} queue{'s' if q > 1 else ''} x {dev['depth']}"
            + (f", {dev['io_mode']} IO" if dev.get("io_mode") else "")
            + (", zero copy" if dev.get("zero_copy") else "")
            + (f", recovery {dev['recovery']}" if dev.get("recovery") else "") + ")"
            + ("\n" + zoned_line(dev["zoned"]) if dev.get("zoned") else ""))


def zoned_line(z: dict) -> str:
    """A zoned device's geometry in one line (add, info)."""
    def limit(n):
        return str(n) if n else "no limit"
    return (f"zoned: {z['zones']} zones of {human(z['zone_size'])} ({z['conv_zones']} conventional), "
            f"max open {limit(z['max_open'])}, max active {limit(z['max_active'])}")


def render_add_fuse(dev: dict) -> str:
    what = f"{dev['describe']}, {human(dev['size'])}"
    if dev.get("loop"):
        return f"dev {dev['name']} -> {dev['loop']} ({what}, FUSE file {dev['file']})"
    return f"dev {dev['name']} -> {dev['file']} ({what}, FUSE file; `losetup` it, or add with --loop)"


def render_del(r: dict) -> str:
    if r["all"]:
        n = len(r["deleted"])
        return f"deleted {n} device{'s' if n != 1 else ''}"
    return "\n".join(f"dev {devids.name(i)} deleted" for i in r["deleted"])


def render_list(devs: list) -> str:
    if not devs:
        return "no ublk devices"
    fuse = [d for d in devs if d.get("transport") == "fuse"]
    devs = [d for d in devs if d.get("transport") != "fuse"]
    if not devs:
        return render_fuse_list(fuse)
    lines = [f"{'ID':>3} {'STATE':<8} {'SIZE':>7} {'Q x D':>9} {'IO':<7} {'PID':>7}  {'TARGET':<28} FEATURES"]
    for d in devs:
        pid = str(d["pid"]) if d["daemon_alive"] else f"{d['pid']}†" if d["pid"] > 0 else "-"
        size = human(d["size"]) if d["size"] is not None else "?"
        lines.append(f"{d['id']:>3} {d['state']:<8} {size:>7} {str(d['queues']) + ' x ' + str(d['depth']):>9} "
                     f"{d.get('io_mode', '-'):<7} {pid:>7}  {d['target']:<28} {','.join(d['flags']) or '-'}")
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


def render_features(r: dict) -> str:
    lines = [f"ublk_drv features 0x{r['mask']:x}"]
    for name, on in r["features"].items():
        lines.append(f"  {'yes' if on else ' no'}  {name:<24} {FEATURE_HELP[name]}")
    return "\n".join(lines)


def stats_table(title: str, rows: list, all_ops: bool = False) -> str:
    """rows: (label prefix, {op: summary}); ops without IO are left out unless all_ops."""
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
    lines = [stats_table(f"dev {devids.name(r['device'])}: {r['inflight']} in flight", rows)]
    if "ring" in r:
        lines.append(ring_line("ring", r["ring"]))
        if queues:
            lines += [ring_line(f"q{q['queue']} ring", q["ring"]) for q in r["queues"] if "ring" in q]
    return "\n".join(lines)


def ring_line(label: str, ring: dict) -> str:
    """What the IO cost in crossings: the figures that do not move with the host's noise."""
    def ratio(v, fmt):
        return "-" if v is None else format(v, fmt)
    return (f"{label}: {ring['enters']} io_uring_enter, {ratio(ring['enters_per_io'], '.3f')} per IO; "
            f"{ratio(ring['cqes_per_enter'], '.1f')} CQEs per enter; "
            f"{ring['commits']} commits, {ratio(ring['ios_per_commit'], '.1f')} IOs per commit"
            + (f"; {ring['copied']} IOs copied on a zero-copy device" if ring.get("copied") else ""))


def render_lat(r: dict) -> str:
    if not r["ios"]:
        return f"dev {devids.name(r['device'])}: no {r['op']} IO yet"
    lines = [f"dev {devids.name(r['device'])} {r['op']}: {r['ios']} IOs, avg {fmt_ns(r['avg_ns'])}, "
             f"p50 {fmt_ns(r['p50_ns'])}, p90 {fmt_ns(r['p90_ns'])}, p99 {fmt_ns(r['p99_ns'])}, "
             f"p99.9 {fmt_ns(r['p999_ns'])}, "
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
    peak = max((b["count"] for b in rows), default=1)
    return [f"{indent}{fmt_ns(b['low_ns']):>8} .. {fmt_ns(b['high_ns']):<8} {b['count']:>9} "
            f"{'#' * max(1, round(width * b['count'] / peak))}" for b in rows]


def tags_table(title: str, tags: list) -> str:
    if not tags:
        return f"{title}: nothing in flight"
    lines = [f"{'Q':>3} {'TAG':>5} {'OP':<13} {'SECTOR+N':<20} {'AGE':>9} FAULT"]
    for t in sorted(tags, key=lambda t: -t["age_ns"]):
        lines.append(f"{t['queue']:>3} {t['tag']:>5} {t['op']:<13} "
                     f"{str(t['sector']) + '+' + str(t['sectors']):<20} {fmt_ns(t['age_ns']):>9} "
                     f"{t.get('fault') or '-'}".rstrip())
    return "\n".join(lines)


def inflight_table(title: str, r: dict) -> str:
    """The tags a daemon serves, and the IO that waits in the kernel for one (kind inflight)."""
    out = tags_table(title, r["tags"])
    if r.get("waiting"):
        out += f"\n{r['waiting']} more waiting in the kernel for a daemon to take them"
    return out


def render_inflight(r: dict) -> str:
    return inflight_table(f"dev {devids.name(r['device'])}", r)
