"""The interactive shell (`ublkshell` with no verb) and `ublkshell -c LINE`.

A client of the server's socket only: every verb is a request to the server,
so the shell works the same for any user the socket lets in and never holds a
device or its statistics open itself. Lines are parsed by the CLI's own
argparse parser, so options, defaults and messages cannot drift apart."""
import argparse
import json
import os
import shlex
import sys
import time

from .. import cli, devids
from ..client import Client, ensure_server, server_running
from ..errors import UblkError, UsageError
from ..faults.grammar import ACTIONS
from . import views

SHELL_ONLY = {
    "top": "refreshing IOPS, MB/s, latency and in-flight per device and queue",
    "info": "a device's line from `list` and its stats",
    "help": "this list, or `help VERB` for one verb's options",
    "quit": "leave the shell (also exit, Ctrl-D)",
    "exit": "leave the shell",
}
FAULT_VERBS = (*ACTIONS, "faults", "clear", "seed", "powercut")
SERVER_VERBS = ("add", "del", "list", "features", "stats", "lat", "inflight", *FAULT_VERBS)
# daemon death and recovery
SERVER_VERBS += ("kill", "recover")
VERBS = (*SERVER_VERBS, "trace", *SHELL_ONLY)
ID_VERBS = {"del", "stats", "lat", "inflight", "trace", "info", "top", *FAULT_VERBS}
# daemon death and recovery
ID_VERBS |= {"kill", "recover"}
RECOVERY_MODES = ("requeue", "reissue", "fail")
MULTI_ID_VERBS = {"del", "top"}
def _target_names() -> tuple:
    from ..targets import TARGETS as table  # the native target table names them

    return tuple(table)


TARGETS = _target_names()
OPS = ("read", "write", "flush", "discard", "write_zeroes")
FILTER_KEYS = ("q=", "tag=", "op=", "lba=", "min_lat=", "errors", "faulted")
HISTORY = "~/.ublkshell_history"
IDS_TTL = 2.0


class Quit(Exception):
    pass


def _subparsers(p: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))


def build_parser() -> argparse.ArgumentParser:
    """The CLI's parser plus the verbs only the shell has."""
    p = cli._parser()
    sub = _subparsers(p)
    top = sub.add_parser("top", help=SHELL_ONLY["top"],
                         description="Refresh per device and per queue: IOPS and MB/s over the "
                                     "interval, latency since the device started, tags in flight. "
                                     "Ctrl-C returns to the prompt.")
    top.add_argument("ids", nargs="*", type=devids.arg, metavar="ID", help="devices to show (default: all listed)")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    info = sub.add_parser("info", help=SHELL_ONLY["info"], description=SHELL_ONLY["info"] + ".")
    info.add_argument("id", type=devids.arg)
    h = sub.add_parser("help", help=SHELL_ONLY["help"], description="List the verbs, or show one verb's help.")
    h.add_argument("topic", nargs="?", metavar="VERB")
    sub.add_parser("quit", help=SHELL_ONLY["quit"], description="Leave the shell.")
    sub.add_parser("exit", help=SHELL_ONLY["exit"], description="Leave the shell.")
    # inside the shell a verb's usage line reads `stats ID`, not `ublkshell stats ID`
    for name, sp in sub.choices.items():
        sp.prog = name
    return p


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class Shell:
    def __init__(self, socket_path: str, out=None, error_prefix: str = "error: "):
        self.path = socket_path
        self.out = out or sys.stdout
        self.error_prefix = error_prefix
        self.parser = build_parser()
        self.sub = _subparsers(self.parser)
        self.client = None
        self._ids = (0.0, [])

    # -- server ------------------------------------------------------------
    def call(self, cmd: str, **args):
        if self.client is None:
            self.client = Client(self.path)
        try:
            return self.client.call(cmd, **args)
        except UblkError as e:
            if "closed the connection" in str(e):
                self._drop()
            raise
        except (OSError, ValueError) as e:
            # a dead or confused connection: the next command reconnects
            self._drop()
            raise UblkError(f"lost the server at {self.path}: {_one_line(e)}") from None
        except KeyboardInterrupt:
            # its reply would arrive later, on a connection we no longer trust
            self._drop()
            raise

    def _drop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def device_ids(self) -> list[int]:
        """For completion: a failing or slow server must not stall typing."""
        at, ids = self._ids
        if time.monotonic() - at < IDS_TTL:
            return ids
        try:
            with Client(self.path, timeout=1.0) as c:
                ids = sorted(d["id"] for d in c.call("list"))
        except Exception:
            ids = []
        self._ids = (time.monotonic(), ids)
        return ids

    def print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    # -- one line ------------------------------------------------------------
    def parse(self, line: str):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise UsageError(f"cannot split the line: {e}") from None
        if not words:
            return None
        if words[0] in ("?", "-h", "--help"):
            words[0] = "help"
        if words[0] not in VERBS:
            raise UsageError(f"unknown command {words[0]!r} (`help` lists them)")
        args, extra = self.parser.parse_known_args(words)
        # as in the CLI: trace filters may come before or after options
        if args.verb == "trace" and not any(e.startswith("-") for e in extra):
            args.filters += extra
        elif extra:
            raise UsageError(f"{args.verb}: unrecognized arguments: {' '.join(extra)}")
        return args

    def execute(self, line: str) -> int:
        """Run one line: 0 done, 1 the server or the device said no, 2 bad input."""
        try:
            args = self.parse(line)
            if args is None:
                return 0
            self.dispatch(args)
            return 0
        except SystemExit as e:
            # argparse after printing `VERB --help`
            return e.code if isinstance(e.code, int) else 0
        except UsageError as e:
            self.error(e)
            return 2
        except UblkError as e:
            self.error(e)
            return 1

    def error(self, e) -> None:
        print(f"{self.error_prefix}{_one_line(e)}", file=sys.stderr, flush=True)

    def dispatch(self, args) -> None:
        verb = args.verb
        if verb in ("quit", "exit"):
            raise Quit()
        if verb == "help":
            self.print(self.help(args.topic))
            return
        if verb == "trace":
            self.trace(args)
            return
        if verb == "top":
            self.top(args)
            return
        if verb == "info":
            self.info(args.id)
            return
        from ..verbs import VERBS as RENDER, dumps

        a = cli._args_of(args)
        if verb == "add" and a.get("file"):
            # the daemon starts from the server's directory, not ours
            a["file"] = os.path.abspath(os.path.expanduser(a["file"]))
        result = self.call(verb, **a)
        render = RENDER[verb][1]
        if getattr(args, "json", False):
            self.print(dumps(result))
        elif verb == "stats":
            self.print(render(result, queues=args.queues))
        else:
            self.print(render(result))

    # -- shell verbs -----------------------------------------------------------
    def help(self, verb) -> str:
        if verb:
            if verb not in VERBS:
                raise UsageError(f"help: no verb {verb!r} (`help` lists them)")
            return self.sub.choices[verb].format_help().rstrip()
        helps = {a.dest: a.help for a in self.sub._choices_actions}
        lines = ["verbs (`help VERB` or `VERB --help` for options; Tab completes):"]
        lines += [f"  {v:<10} {helps.get(v, '')}" for v in VERBS]
        return "\n".join(lines)

    def info(self, dev_id: int) -> None:
        from ..verbs import render_list, render_stats

        try:
            devs = [d for d in self.call("list") if d["id"] == dev_id]
            listed = render_list(devs) if devs else f"dev {dev_id}: not among the kernel's ublk devices"
        except UsageError:
            raise
        except UblkError as e:
            devs, listed = None, f"dev {dev_id}: list failed: {_one_line(e)}"
        try:
            stats = render_stats(self.call("stats", id=dev_id))
        except UblkError as e:
            if not devs:
                raise
            stats = f"dev {dev_id}: no stats: {_one_line(e)}"
        self.print(listed)
        self.print(stats)

    def trace(self, args) -> None:
        from ..stats import Filter, format_record
        from ..units import parse_duration
        from ..validate import check
        from ..verbs import TRACE_ARGS, TRACE_HEADER

        check("trace", TRACE_ARGS, cli._args_of(args))
        Filter.parse(args.filters)  # bad filters: one line before the header
        duration = parse_duration(args.duration, "--duration", default_unit="s") / 1e9 if args.duration else 0.0
        self.call("stats", id=args.id)  # an unknown device: one line before the header
        # its own connection: Ctrl-C closes it and the server stops sending
        c = Client(self.path, timeout=duration or None)
        deadline = time.monotonic() + duration if duration else None
        records = c.stream("trace", id=args.id, filters=list(args.filters),
                           from_start=args.from_start, count=args.count)
        try:
            if not args.json:
                self.print(TRACE_HEADER)
            for r in records:
                self.print(json.dumps(r, sort_keys=True) if args.json else format_record(r))
                if deadline:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    c.sock.settimeout(left)
        except KeyboardInterrupt:
            self.print()
        except TimeoutError:
            pass  # --duration is up
        except (OSError, ValueError) as e:
            raise UblkError(f"trace: lost the server: {_one_line(e)}") from None
        finally:
            records.close()
            c.close()

    def _sample(self, ids) -> tuple[list, dict, dict]:
        if not ids:
            ids = sorted(d["id"] for d in self.call("list"))
        stats, errors = {}, {}
        for dev_id in ids:
            try:
                stats[dev_id] = self.call("stats", id=dev_id)
            except UsageError:
                raise
            except UblkError as e:
                errors[dev_id] = _one_line(e)
        return ids, stats, errors

    def top(self, args) -> None:
        from ..validate import fraction

        args.interval = fraction(0.01, 86400)(args.interval, "top: --interval")
        tty = self.out.isatty()
        try:
            ids, old, _ = self._sample(args.ids)
            t_old = time.monotonic()
            if tty:
                self.out.write(views.CLEAR + "ublkshell top: sampling...\n")
                self.out.flush()
            while True:
                time.sleep(args.interval)
                ids, new, errors = self._sample(args.ids)
                t_new = time.monotonic()
                samples = [(i, old.get(i), new.get(i), errors.get(i)) for i in ids]
                frame = views.render_top(samples, t_new - t_old, args.interval)
                if tty:
                    self.out.write(views.CLEAR + frame + "\n")
                    self.out.flush()
                else:
                    self.print(frame + "\n")
                old, t_old = new, t_new
        except KeyboardInterrupt:
            self.print()


def _session(shell: Shell):
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.shortcuts import CompleteStyle

    from .completion import ShellCompleter

    path = os.path.expanduser(HISTORY)
    try:
        with open(path, "a"):
            pass
        history = FileHistory(path)
    except OSError:
        history = InMemoryHistory()  # an unwritable home must not keep the shell from starting
    return PromptSession("ublk> ", history=history, completer=ShellCompleter(shell),
                         complete_style=CompleteStyle.READLINE_LIKE, complete_while_typing=False)


def _connect(socket_path: str) -> None:
    if server_running(socket_path):
        return
    if os.geteuid() != 0:
        # a server started by us would exit at once; say why now rather than after a timeout
        raise UblkError(f"no ublkshell server answers at {socket_path}, and only root can start "
                        "one (`sudo ublkshell serve`)")
    ensure_server(socket_path)


def run(command, socket_path: str) -> int:
    # -c is a command line like any other: its errors read like the CLI's
    shell = Shell(socket_path, error_prefix="error: " if command is None else "ublkshell: ")
    try:
        if command is not None:
            try:
                return shell.execute(command)
            except Quit:
                return 0
        try:
            _connect(socket_path)
        except UblkError as e:
            shell.error(e)
            return 1
        if not sys.stdin.isatty():
            return _script(shell)
        return _interactive(shell)
    finally:
        shell._drop()


def _script(shell: Shell) -> int:
    """Lines from a pipe: no prompt, no editing; the worst exit code wins."""
    rc = 0
    for line in sys.stdin:
        try:
            rc = max(rc, shell.execute(line))
        except Quit:
            break
    return rc


def _interactive(shell: Shell) -> int:
    session = _session(shell)
    while True:
        try:
            line = session.prompt()
        except KeyboardInterrupt:
            continue
        except EOFError:
            return 0
        try:
            shell.execute(line)
        except Quit:
            return 0
        except KeyboardInterrupt:
            shell.print()
        except Exception as e:  # a bug: one line, and the shell stays
            if os.environ.get("UBLKSHELL_DEBUG"):
                raise
            shell.error(f"internal error: {type(e).__name__}: {e} (UBLKSHELL_DEBUG=1 shows the traceback)")
