"""Command line: argument parsing -> device operations; one-line errors."""
import json
import os
import signal
import sys

from . import commands
from .errors import UblkError, UsageError

def _one_shot(args) -> int:
    from .verbs import VERBS, call, dumps

    render = VERBS[args.verb].render
    result = call(args.verb, commands.args_of(args))
    if getattr(args, "json", False):
        print(dumps(result))
    elif args.verb == "stats":
        print(render(result, queues=args.queues))
    else:
        print(render(result))
    return 0


def _cmd_trace(args) -> int:
    from .observe.shm import open_device
    from .observe.trace import TRACE_HEADER, Filter, follow, format_record
    from .validate import check
    from .verbs import TRACE_ARGS

    a = check("trace", TRACE_ARGS, commands.args_of(args))
    flt = Filter.parse(a["filters"])
    duration = a["duration"] / 1e9
    s = open_device(a["id"])
    if args.json:
        emit = lambda r: print(json.dumps(r, sort_keys=True), flush=True)  # noqa: E731
    else:
        print(TRACE_HEADER, flush=True)
        emit = lambda r: print(format_record(r), flush=True)  # noqa: E731
    try:
        lost = follow(s, flt, emit, count=a["count"], duration=duration, from_start=a["from_start"])
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
    # started from a background job, SIGINT arrives ignored: Ctrl-C must still end a trace or top
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if argv[:1] == ["vm"]:
        from .vm.harness import main as vm_main

        return vm_main(argv[1:])
    parser = commands.cli_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # trace filters may come before or after options (trace 0 --json op=write)
        if args.verb == "trace" and not any(e.startswith("-") for e in extra):
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
        if args.verb == "serve":
            from .bridge.protocol import SOCKET_PATH
            from .bridge.server import serve

            if args.keep_devices and args.delete_devices:
                raise UsageError("serve: --keep-devices or --delete-devices, not both")
            return serve(args.socket or args.shell_socket or SOCKET_PATH,
                         None if args.no_fuse else args.mount, args.delete_devices,
                         auto_recover=args.auto_recover)
        if args.verb == "demo":
            return _cmd_demo(args)
        return _one_shot(args)
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
