"""What every device daemon (bridge/daemon.py, bridge/fuse_daemon.py) does around its own
start and serve: read `--spec JSON --ready-fd N`, leave the working directory, install its
signal handlers, and tell the spawner in one JSON line whether it serves."""
import json
import os
import signal
import sys
import time

from ..errors import UblkError


def log(msg: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} ublkshell-daemon[{os.getpid()}]: {msg}\n")
    sys.stderr.flush()


def _daemon_args(prog: str, argv: list[str]) -> tuple[str, int]:
    """`--spec JSON [--ready-fd N]`, as spawn.py passes them. No argparse: a daemon starts for
    every `add` and `recover`, and under emulation importing argparse costs ~0.4 s of that."""
    spec, ready_fd, rest = None, -1, list(argv)
    while rest:
        opt = rest.pop(0)
        if opt in ("--spec", "--ready-fd") and rest:
            value = rest.pop(0)
            if opt == "--spec":
                spec = value
            elif value.lstrip("-").isdigit():
                ready_fd = int(value)
            else:
                raise SystemExit(f"{prog}: --ready-fd: not a number: {value!r}")
        else:
            raise SystemExit(f"usage: {prog} --spec JSON [--ready-fd N] (started by `ublkshell add`)")
    if spec is None:
        raise SystemExit(f"usage: {prog} --spec JSON [--ready-fd N] (started by `ublkshell add`)")
    return spec, ready_fd


def daemon_main(argv, prog: str, make, handlers: dict, on_failure=None) -> int:
    """What every device daemon does around its own start and serve: take --spec and
    --ready-fd, leave the working directory, install its signal handlers, tell the
    spawner in one JSON line whether it serves."""
    spec, ready_fd = _daemon_args(prog, sys.argv[1:] if argv is None else argv)
    # hold no directory of a filesystem that may end up on our own device
    os.chdir("/")
    for s, handler in handlers.items():
        signal.signal(s, handler)

    def report(msg: dict) -> None:
        nonlocal ready_fd
        if ready_fd >= 0:
            try:
                os.write(ready_fd, (json.dumps(msg) + "\n").encode())
                os.close(ready_fd)
            except OSError:
                pass
            ready_fd = -1

    d = None
    try:
        d = make(json.loads(spec))
        entry = d.start()
    except Exception as e:
        if isinstance(e, UblkError):
            msg = str(e)
        elif isinstance(e, OSError):
            msg = f"{e.filename or ''}: {e.strerror}".lstrip(": ")
        else:
            # a bug: the spawner gets one line, the log gets the traceback
            import traceback

            msg = f"internal error: {type(e).__name__}: {e}"
            traceback.print_exc()
        log(f"failed: {msg}")
        if d is not None and on_failure is not None:
            try:
                on_failure(d)
            except Exception as e2:
                log(f"cleaning up after the failure: {type(e2).__name__}: {e2}")
        report({"ok": False, "error": msg})
        return 1
    report({"ok": True, "device": entry})
    return d.serve()
