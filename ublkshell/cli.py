"""Command line: argument parsing -> device operations; one-line errors."""
import json
import os
import signal
import sys

from . import commands
from .errors import UblkError, UsageError

def _one_shot(args) -> int:
    from .verbs import VERBS, call, dumps

    if args.verb == "stats" and args.interval:
        return _cmd_stats_interval(args)

    render = VERBS[args.verb].render
    result = call(args.verb, commands.args_of(args))
    if getattr(args, "json", False):
        print(dumps(result))
    elif args.verb == "stats":
        print(render(result, queues=args.queues))
    else:
        print(render(result))
    return 0


def _cmd_stats_interval(args) -> int:
    import time

    from .devices.ids import name
    from .observe.iostat import HEADER, block_name, render_row, row, sample
    from .observe.recording import device_node
    from .observe.shm import open_device
    from .validate import check
    from .verbs import STATS_INTERVAL_ARGS

    a = check("stats", STATS_INTERVAL_ARGS, commands.args_of(args))
    if a["queues"]:
        raise UsageError("stats: --interval shows the device as a whole (--queues is for one-shot stats)")
    s = open_device(a["id"])
    block = block_name(device_node(a["id"]))
    interval = a["interval"] / 1e9
    label = block or name(a["id"])
    if not a["json"]:
        print(HEADER if block else HEADER + "   (no block device: kernel columns -)", flush=True)
    prev, shown = sample(s, block), 0
    try:
        while not a["count"] or shown < a["count"]:
            time.sleep(max(0.0, prev["t"] + interval - time.monotonic()))
            cur = sample(s, block)
            r = row(prev, cur)
            prev, shown = cur, shown + 1
            if a["json"]:
                print(json.dumps({"device": name(a["id"]), "block": block, **r}, sort_keys=True), flush=True)
            else:
                print(render_row(label, r), flush=True)
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_trace(args) -> int:
    from .devices.ids import name
    from .observe.recording import Iolog, blkparse_text, device_node, pump, refuse_unrecorded
    from .observe.shm import open_device
    from .observe.trace import TRACE_FORMATS, TRACE_HEADER, Filter, Follow, follow, format_record
    from .validate import check
    from .verbs import TRACE_ARGS

    a = check("trace", TRACE_ARGS, commands.args_of(args))
    fmt = a["format"] or ("json" if a["json"] else "text")
    if fmt not in TRACE_FORMATS:
        raise UsageError(f"trace: unknown format {fmt!r} (choose from {', '.join(TRACE_FORMATS)})")
    if a["json"] and fmt != "json":
        raise UsageError(f"trace: --json or --format {fmt}, not both")
    flt = Filter.parse(a["filters"])
    duration = a["duration"] / 1e9
    s = open_device(a["id"])
    refuse_unrecorded(a["id"], "trace")
    if fmt == "fio-iolog":
        # in the order the IOs began, which waits for the IOs in flight: pump orders them
        f = Follow(s, flt, count=a["count"], from_start=a["from_start"], device=name(a["id"]))
        lost = pump(s, f, Iolog(device_node(a["id"]), out=sys.stdout), duration_s=duration)
    else:
        if fmt == "json":
            emit = lambda r: print(json.dumps(r, sort_keys=True), flush=True)  # noqa: E731
        elif fmt == "blkparse":
            line = blkparse_text(a["id"]).line
            emit = lambda r: print(line(r), flush=True)  # noqa: E731
        else:
            from .colour import of_record, paint

            print(TRACE_HEADER, flush=True)

            def emit(r):
                line, colour = format_record(r), of_record(r)
                print(paint(line, colour, sys.stdout) if colour else line, flush=True)
        try:
            lost = follow(s, flt, emit, count=a["count"], duration=duration, from_start=a["from_start"],
                          device=name(a["id"]))
        except KeyboardInterrupt:
            return 0
    if lost:
        print(f"ublkshell: {lost} records lost (the reader fell behind)", file=sys.stderr)
    return 0


def _cmd_record(args) -> int:
    from .devices.ids import name
    from .observe import blktrace
    from .observe.recording import (MAX_LAG_NS, BlktraceFiles, Iolog, check_format, daemon_pid, device_node,
                                    pump, refuse_unrecorded)
    from .observe.shm import open_device
    from .observe.trace import Filter, Follow
    from .validate import check
    from .verbs import RECORD_ARGS

    a = check("record", RECORD_ARGS, commands.args_of(args))
    fmt = check_format(a["format"])
    flt = Filter.parse(a["filters"])
    s = open_device(a["id"])
    refuse_unrecorded(a["id"], "record")
    node = device_node(a["id"])
    # `timeout 30 ublkshell record ...` and a closed terminal end it as Ctrl-C does: files in place
    old = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        if fmt == "blktrace":
            writer = BlktraceFiles(a["output"], s.nr_queues, daemon_pid(a["id"]), blktrace.device_number(node),
                                   a["force"])
            where = f"{a['output']}.blktrace.{{0..{s.nr_queues - 1}}}" if s.nr_queues > 1 else writer.paths[0]
        else:
            writer = Iolog(node, path=a["output"], force=a["force"])
            where = a["output"]
        stop = " or ".join(([f"{a['count']} IOs"] if a["count"] else [])
                           + ([f"{a['duration'] / 1e9:g} s"] if a["duration"] else [])) or "Ctrl-C"
        f = Follow(s, flt, count=a["count"], from_start=a["from_start"], device=name(a["id"]))
        # said once the rings' position is taken: every IO that starts after this line is recorded
        print(f"recording device {name(a['id'])} to {where} until {stop}", file=sys.stderr, flush=True)
        lost = pump(s, f, writer, duration_s=a["duration"] / 1e9)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    result = {**writer.summary(), "device": name(a["id"]), "lost": lost}
    if a["json"]:
        print(json.dumps(result, sort_keys=True))
        return 0
    notes = []
    if lost:
        notes.append(f"{lost} lost: the recorder fell behind")
    if result["late"]:
        notes.append(f"{result['late']} events out of time order: an IO held over {MAX_LAG_NS // 10**9} s")
    notes += [f"left out {n} {op} (fio has no such op)" for op, n in result.get("skipped", {}).items()]
    print(f"recorded {result['ios']} IOs to {where}" + (f" ({'; '.join(notes)})" if notes else ""))
    for cmd in result["read_with"]:
        print(f"  {cmd}")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _cmd_top(args) -> int:
    from .repl.top import run_top, sampler
    from .validate import check
    from .verbs import TOP_ARGS, call

    a = check("top", TOP_ARGS, commands.args_of(args))
    try:
        run_top(sampler(lambda verb, **kw: call(verb, kw)), a["ids"], a["interval"] / 1e9, a["count"],
                a["batch"], sys.stdout)
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.size, allow_vm=not args.no_vm)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # started from a background job, SIGINT arrives ignored: Ctrl-C must still end a trace or top
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if argv[:1] == ["vm"]:
        from .vm.harness import main as vm_main

        return vm_main(argv[1:])
    if argv[:1] in (["udev"], ["udev-rules"]):
        # the admin's hook (udev's RUN) and its rules: not a verb of the shell or the socket
        from .devices.udev import main as udev_main

        return udev_main(argv)
    try:
        rc = _dispatch(_parser(), argv)
        # what is still buffered goes out here, where a reader that left is handled below
        sys.stdout.flush()
        return rc
    except UsageError as e:
        _error(e)
        return 2
    except UblkError as e:
        _error(e)
        return 1
    except KeyboardInterrupt:
        print("ublkshell: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`| head`): nothing to report, and nothing left to flush at exit
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 128 + signal.SIGPIPE
    except Exception as e:  # a bug: one line for users, the traceback on request
        if os.environ.get("UBLKSHELL_DEBUG"):
            raise
        print(f"ublkshell: internal error: {type(e).__name__}: {e} "
              "(UBLKSHELL_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 70


_parsers = []


def _parser():
    """The command table, built once per process: building it is most of a verb's own cost
    under emulation (~0.4 s), and the tests and the API call main() many times. Parsing
    leaves a parser as it was, so one serves every call."""
    if not _parsers:
        _parsers.append(commands.cli_parser())
    return _parsers[0]


def _error(e) -> None:
    from .colour import paint

    print(paint(f"ublkshell: {e}", "red", sys.stderr), file=sys.stderr)


def _dispatch(parser, argv) -> int:
    args, extra = parser.parse_known_args(argv)
    # trace filters may come before or after options (trace 0 --json op=write)
    if args.verb in ("trace", "record") and not any(e.startswith("-") for e in extra):
        args.filters += extra
    elif extra:
        raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
    if not args.verb:
        from .bridge.protocol import SOCKET_PATH
        from .repl.shell import run as shell

        return shell(args.command, args.shell_socket or SOCKET_PATH)
    if args.command is not None:
        raise UsageError(f"-c COMMAND or a verb ({args.verb}), not both: quote the command (-c \"stats 0\")")
    if args.verb == "trace":
        return _cmd_trace(args)
    if args.verb == "record":
        return _cmd_record(args)
    if args.verb == "replay":
        from .crash.replay import run as replay

        return replay(commands.args_of(args))
    if args.verb == "crashtest":
        from .crash.crashtest import run as crashtest

        a = commands.args_of(args)
        if a["workload"][:1] == ["--"]:
            a["workload"] = a["workload"][1:]
        # a SIGTERM or a closed terminal ends it as Ctrl-C does: its device, mounts and images go
        old = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
        try:
            return crashtest(a)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
    if args.verb == "serve":
        from .bridge.protocol import SOCKET_PATH
        from .bridge.server import default_mount, serve

        if args.keep_devices and args.delete_devices:
            raise UsageError("serve: --keep-devices or --delete-devices, not both")
        return serve(args.socket or args.shell_socket or SOCKET_PATH,
                     None if args.no_fuse else (args.mount or default_mount()), args.delete_devices,
                     auto_recover=args.auto_recover)
    if args.verb == "demo":
        return _cmd_demo(args)
    if args.verb == "completion":
        from .completions import script

        print(script(args.shell), end="")
        return 0
    if args.verb == "top":
        return _cmd_top(args)
    return _one_shot(args)
