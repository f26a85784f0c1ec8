"""Command line: argument parsing -> device operations; one-line errors."""
import argparse
import json
import os
import sys

from .errors import UblkError, UsageError
from .sizes import human

EPILOG = """\
examples:
  ublkshell add -t loop -f disk.img -q 2 -d 128   serve disk.img as /dev/ublkbN
  ublkshell add -t mem --size 1G                  RAM-backed, sparse
  ublkshell add -t null --size 100G               completes at once, reads zeros
  ublkshell list                                  what exists, who serves it
  ublkshell features                              what this kernel's ublk_drv can do
  ublkshell del 0 | ublkshell del -a              delete one device | all
  ublkshell stats 0                               IOs, bytes, errors, latency percentiles per op
  ublkshell lat 0 read                            latency histogram with percentiles
  ublkshell inflight 0                            tags being served now, with their age
  ublkshell trace 0 op=write min_lat=1ms          every IO as it completes, until Ctrl-C
  ublkshell demo                                  a mem device, ext4 on it, then gone
  ublkshell vm -- CMD...                          run CMD in the bundled VM (a kernel with ublk_drv)

Each device is served by its own IO daemon process (logs under /run/ublkshell/log);
the command that created it may exit. ublk control needs root.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ublkshell", description="Serve, watch and break Linux ublk block devices.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)

    a = sub.add_parser("add", help="create a device served by a new IO daemon",
                       description="Create /dev/ublkbN and serve it from a new IO daemon process.")
    a.add_argument("-t", "--type", required=True, metavar="TARGET",
                   help="null (completes at once, reads zeros), mem (RAM, sparse), loop (a file or block device)")
    a.add_argument("-f", "--file", help="loop: the backing file or block device")
    a.add_argument("--size", help="device size, e.g. 512M, 1G (loop: defaults to the file's size)")
    a.add_argument("-q", "--queues", type=int, default=1, help="hardware queues, one thread each (default 1)")
    a.add_argument("-d", "--depth", type=int, default=128, help="tags per queue, 1..4096 (default 128)")
    a.add_argument("-n", "--number", type=int, default=-1, help="device id to ask for (default: any free)")
    a.add_argument("--block-size", help="logical block size: 512 (default), 1k, 2k, 4k")
    a.add_argument("--max-io", default="512k", help="largest single IO (default 512k)")
    a.add_argument("--json", action="store_true", help="print the new device as JSON")

    d = sub.add_parser("del", help="delete devices", description="Stop and delete ublk devices.")
    d.add_argument("ids", nargs="*", type=int, metavar="ID")
    d.add_argument("-a", "--all", action="store_true", help="delete every ublk device")

    ls = sub.add_parser("list", help="list devices", description="List ublk devices.")
    ls.add_argument("--json", action="store_true", help="machine-readable output")

    f = sub.add_parser("features", help="what the running kernel's ublk_drv supports",
                       description="Ask ublk_drv (UBLK_U_CMD_GET_FEATURES) what it supports.")
    f.add_argument("--json", action="store_true")

    st = sub.add_parser("stats", help="IO counters and latency percentiles of a device",
                        description="Counters and latency percentiles per op, from the device's "
                                    "shared memory (they survive a killed daemon).")
    st.add_argument("id", type=int)
    st.add_argument("--json", action="store_true")
    st.add_argument("--queues", action="store_true", help="one line per queue too")

    lt = sub.add_parser("lat", help="latency histogram of a device",
                        description="Latency histogram (log-linear buckets, ~3%% precision) with percentiles.")
    lt.add_argument("id", type=int)
    lt.add_argument("op", nargs="?", default="read", help="read (default), write, flush, discard, write_zeroes")
    lt.add_argument("--json", action="store_true")

    inf = sub.add_parser("inflight", help="tags being served now",
                         description="Tags the daemon is serving now, per queue, with their age and request.")
    inf.add_argument("id", type=int)
    inf.add_argument("--json", action="store_true")

    tr = sub.add_parser("trace", help="stream every IO as it completes",
                        description="Stream completed IOs: time q tag op flags sector+sectors latency result. "
                                    "Filters: q=N tag=N op=read|write|flush|discard|write_zeroes "
                                    "lba=A..B (sectors) min_lat=1ms errors. Ctrl-C ends it.")
    tr.add_argument("id", type=int)
    tr.add_argument("filters", nargs="*", metavar="FILTER")
    tr.add_argument("--json", action="store_true", help="one JSON object per line")
    tr.add_argument("--count", type=int, default=0, help="stop after N records")
    tr.add_argument("--duration", default="", help="stop after this long (e.g. 10s)")
    tr.add_argument("--from-start", action="store_true",
                    help="begin with the records still in the rings, not only new ones")

    demo = sub.add_parser("demo", help="a mem device with ext4 on it, end to end",
                          description="Create a mem device, put ext4 on it, write and check files, "
                                      "run fio verify, delete it. Uses the bundled VM when this "
                                      "kernel has no ublk_drv.")
    demo.add_argument("--size", default="256M")
    demo.add_argument("--no-vm", action="store_true", help="never fall back to the VM")

    sub.add_parser("vm", help="run a command inside the bundled VM (kernel with ublk_drv)",
                   add_help=False)
    return p


def _cmd_add(args) -> int:
    from .devices import add
    from .targets import build_spec

    spec = build_spec(args.type, file=args.file, size=args.size, queues=args.queues,
                      depth=args.depth, block_size=args.block_size, max_io=args.max_io,
                      dev_id=args.number)
    dev = add(spec)
    if args.json:
        print(json.dumps(dev, sort_keys=True))
    else:
        print(f"dev {dev['id']} -> /dev/ublkb{dev['id']} ({dev['describe']}, "
              f"{human(dev['size'])}, {dev['queues']} queue{'s' if dev['queues'] > 1 else ''} "
              f"x {dev['depth']})")
    return 0


def _cmd_del(args) -> int:
    from .devices import delete, delete_all

    if args.all:
        if args.ids:
            raise UsageError("del: give device ids or -a, not both")
        ids = delete_all()
        print(f"deleted {len(ids)} device{'s' if len(ids) != 1 else ''}")
        return 0
    if not args.ids:
        raise UsageError("del: which device? give an id (see `ublkshell list`) or -a for all")
    for dev_id in args.ids:
        delete(dev_id)
        print(f"dev {dev_id} deleted")
    return 0


def _cmd_list(args) -> int:
    from .devices import list_devices

    devs = list_devices()
    if args.json:
        print(json.dumps(devs, sort_keys=True))
        return 0
    if not devs:
        print("no ublk devices")
        return 0
    print(f"{'ID':>3} {'STATE':<8} {'SIZE':>7} {'Q x D':>9} {'PID':>7}  {'TARGET':<28} FEATURES")
    for d in devs:
        pid = str(d["pid"]) if d["daemon_alive"] else f"{d['pid']}†" if d["pid"] > 0 else "-"
        size = human(d["size"]) if d["size"] is not None else "?"
        print(f"{d['id']:>3} {d['state']:<8} {size:>7} {str(d['queues']) + ' x ' + str(d['depth']):>9} "
              f"{pid:>7}  {d['target']:<28} {','.join(d['flags']) or '-'}")
    if any(not d["daemon_alive"] for d in devs):
        print("† daemon gone: IO fails until the device is deleted (`ublkshell del ID`)")
    return 0


def _cmd_features(args) -> int:
    from .devices import features
    from .uapi import FEATURE_HELP, FEATURES

    mask = features()
    if args.json:
        print(json.dumps({"mask": mask, "features": {n: bool(mask & b) for n, b in FEATURES.items()}}))
        return 0
    print(f"ublk_drv features 0x{mask:x}")
    for name, bit in FEATURES.items():
        mark = "yes" if mask & bit else " no"
        print(f"  {mark}  {name:<24} {FEATURE_HELP[name]}")
    return 0


def _cmd_stats(args) -> int:
    from .bridge.shm import OPS, open_device
    from .stats import fmt_ns, snapshot, summarize

    snap = snapshot(open_device(args.id))
    if args.json:
        out = {"device": args.id, "inflight": snap["inflight"],
               "ops": {n: summarize(o) for n, o in snap["ops"].items()},
               "queues": [{"queue": q["queue"], "inflight": q["inflight"],
                           "ops": {n: summarize(o) for n, o in q["ops"].items()}} for q in snap["queues"]]}
        print(json.dumps(out, sort_keys=True))
        return 0
    print(f"dev {args.id}: {snap['inflight']} in flight")
    print(f"{'OP':<13}{'IOS':>10}{'BYTES':>10}{'ERRORS':>8}{'AVG':>9}{'P50':>9}{'P99':>9}{'MAX':>9}")
    rows = [("", snap["ops"])]
    if args.queues:
        rows += [(f"q{q['queue']} ", q["ops"]) for q in snap["queues"]]
    for prefix, ops in rows:
        for name in OPS:
            o = summarize(ops[name])
            if not o["ios"]:
                continue
            print(f"{prefix + name:<13}{o['ios']:>10}{human(o['bytes']):>10}{o['errors']:>8}"
                  f"{fmt_ns(o['avg_ns']):>9}{fmt_ns(o['p50_ns']):>9}{fmt_ns(o['p99_ns']):>9}{fmt_ns(o['max_ns']):>9}")
    return 0


def _cmd_lat(args) -> int:
    from ._native import lib
    from .bridge.shm import OPS, open_device
    from .stats import fmt_ns, snapshot, summarize

    if args.op not in OPS:
        raise UsageError(f"lat: unknown op {args.op!r} (choose from {', '.join(OPS)})")
    op = snapshot(open_device(args.id))["ops"][args.op]
    sm = summarize(op)
    if args.json:
        buckets = [{"low_ns": lib.us_hist_low(i), "count": n} for i, n in enumerate(op["hist"]) if n]
        print(json.dumps({"device": args.id, "op": args.op, **sm, "buckets": buckets}, sort_keys=True))
        return 0
    if not sm["ios"]:
        print(f"dev {args.id}: no {args.op} IO yet")
        return 0
    # regroup the ~3% buckets into powers of two so that the picture fits a terminal
    rows = {}
    for i, n in enumerate(op["hist"]):
        if n:
            low = lib.us_hist_low(i)
            key = 1 << max(0, low.bit_length() - 1) if low else 0
            rows[key] = rows.get(key, 0) + n
    peak = max(rows.values())
    print(f"dev {args.id} {args.op}: {sm['ios']} IOs, avg {fmt_ns(sm['avg_ns'])}, "
          f"p50 {fmt_ns(sm['p50_ns'])}, p99 {fmt_ns(sm['p99_ns'])}, p99.9 {fmt_ns(sm['p999_ns'])}, "
          f"max {fmt_ns(sm['max_ns'])}")
    for low in sorted(rows):
        n = rows[low]
        bar = "#" * max(1, round(50 * n / peak))
        print(f"{fmt_ns(low):>8} .. {fmt_ns(max(1, low * 2)):<8} {n:>9} {bar}")
    return 0


def _cmd_inflight(args) -> int:
    from .bridge.shm import open_device
    from .stats import fmt_ns, inflight

    tags = inflight(open_device(args.id))
    if args.json:
        print(json.dumps(tags, sort_keys=True))
        return 0
    if not tags:
        print(f"dev {args.id}: nothing in flight")
        return 0
    print(f"{'Q':>3} {'TAG':>5} {'OP':<13} {'SECTOR+N':<20} {'AGE':>9}")
    for t in sorted(tags, key=lambda t: -t["age_ns"]):
        print(f"{t['queue']:>3} {t['tag']:>5} {t['op']:<13} {str(t['sector']) + '+' + str(t['sectors']):<20} "
              f"{fmt_ns(t['age_ns']):>9}")
    return 0


def _cmd_trace(args) -> int:
    from .bridge.shm import open_device
    from .stats import Filter, follow, format_record, parse_duration

    flt = Filter.parse(args.filters)
    duration = parse_duration(args.duration, "--duration") / 1e9 if args.duration else 0.0
    s = open_device(args.id)
    if args.json:
        emit = lambda r: print(json.dumps(r, sort_keys=True), flush=True)  # noqa: E731
    else:
        print(f"{'TIME(s)':>12} {'Q':<3} {'TAG':<5} {'OP':<12} {'FLAGS':<8} SECTOR+N  LATENCY RESULT", flush=True)
        emit = lambda r: print(format_record(r), flush=True)  # noqa: E731
    try:
        lost = follow(s, flt, emit, count=args.count, duration=duration, from_start=args.from_start)
    except KeyboardInterrupt:
        return 0
    if lost:
        print(f"ublkshell: {lost} records lost (the reader fell behind)", file=sys.stderr)
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.size, allow_vm=not args.no_vm)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["vm"]:
        from .vm.harness import main as vm_main

        return vm_main(argv[1:])
    parser = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # trace filters may come before or after options (trace 0 --json op=write)
        if args.verb == "trace" and not any(e.startswith("-") for e in extra):
            args.filters += extra
        elif extra:
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
        if not args.verb:
            parser.print_help()
            return 0
        return {"add": _cmd_add, "del": _cmd_del, "list": _cmd_list, "features": _cmd_features,
                "stats": _cmd_stats, "lat": _cmd_lat, "inflight": _cmd_inflight,
                "trace": _cmd_trace, "demo": _cmd_demo}[args.verb](args)
    except UsageError as e:
        print(f"ublkshell: {e}", file=sys.stderr)
        return 2
    except UblkError as e:
        print(f"ublkshell: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ublkshell: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line for users, the traceback on request
        if os.environ.get("UBLKSHELL_DEBUG"):
            raise
        print(f"ublkshell: internal error: {type(e).__name__}: {e} "
              "(UBLKSHELL_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 70
