"""The interactive shell (`ublkshell` with no verb) and `ublkshell -c LINE`.

A client of the server's socket only: every verb is a request to the server,
so the shell works the same for any user the socket lets in and never holds a
device or its statistics open itself. Lines are parsed with the command line's
own table (commands.py), so options, defaults and messages cannot drift apart."""
import json
import os
import shlex
import stat
import sys
import time

from .. import commands
from ..commands import VERBS
from ..bridge.client import Client, ensure_server, server_running
from ..colour import of_record, paint
from ..errors import UblkError, UsageError

OLD_HISTORY = "~/.ublkshell_history"
IDS_TTL = 2.0


class Quit(Exception):
    pass


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class Shell:
    def __init__(self, socket_path: str, out=None, error_prefix: str = "error: "):
        self.path = socket_path
        self.out = out or sys.stdout
        self.error_prefix = error_prefix
        self.parser = commands.shell_parser()
        self.sub = commands.subparsers(self.parser)
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
        print(paint(f"{self.error_prefix}{_one_line(e)}", "red", sys.stderr), file=sys.stderr, flush=True)

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
        if verb == "stats" and getattr(args, "interval", None):
            raise UsageError("stats --interval runs on the command line (`ublkshell stats ID --interval 1`); "
                             "here, `top` refreshes")
        from ..verbs import VERBS as RENDER, dumps

        a = commands.args_of(args)
        for path_arg in ("file", "log_writes"):
            if verb == "add" and a.get(path_arg):
                # the daemon starts from the server's directory, not ours
                a[path_arg] = os.path.abspath(os.path.expanduser(a[path_arg]))
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

    def trace(self, args) -> None:
        from ..observe.trace import TRACE_HEADER, Filter, format_record
        from ..validate import check
        from ..verbs import TRACE_ARGS

        a = check("trace", TRACE_ARGS, commands.args_of(args))
        duration = a["duration"] / 1e9
        fmt = a["format"] or ("json" if a["json"] else "text")
        if a["json"] and fmt != "json":
            raise UsageError(f"trace: --json or --format {fmt}, not both")
        if fmt not in ("text", "json", "blkparse"):
            raise UsageError(f"trace: format {fmt!r} is text, json or blkparse here "
                             "(an fio iolog waits for the IOs in flight: `ublkshell record` writes one)")
        Filter.parse(args.filters)  # bad filters: one line before the header
        self.call("stats", id=args.id)  # an unknown device: one line before the header
        if fmt == "blkparse":
            from ..observe.recording import blkparse_text

            show = blkparse_text(args.id).line
        elif fmt == "json":
            show = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
        else:
            show = format_record
        # its own connection: Ctrl-C closes it and the server stops sending
        c = Client(self.path, timeout=duration or None)
        deadline = time.monotonic() + duration if duration else None
        records = c.stream("trace", id=args.id, filters=list(args.filters),
                           from_start=args.from_start, count=args.count)
        try:
            if fmt == "text":
                self.print(TRACE_HEADER)
            for r in records:
                colour = of_record(r)
                self.print(paint(show(r), colour, self.out) if colour else show(r))
                if deadline:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    c.sock.settimeout(left)
        except KeyboardInterrupt:
            self.print()
        except TimeoutError:
            pass  # --duration is up
        except BrokenPipeError:
            raise  # our own stdout closed (`-c "trace 0" | head`), not the server
        except (OSError, ValueError) as e:
            raise UblkError(f"trace: lost the server: {_one_line(e)}") from None
        finally:
            records.close()
            c.close()

    def top(self, args) -> None:
        from ..validate import check
        from ..verbs import TOP_ARGS
        from .top import run_top, sampler

        a = check("top", TOP_ARGS, commands.args_of(args))
        try:
            run_top(sampler(self.call), a["ids"], a["interval"] / 1e9, a["count"], a["batch"], self.out)
        except KeyboardInterrupt:
            self.print()


def _session(shell: Shell):
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.shortcuts import CompleteStyle

    from .completion import ShellCompleter

    try:
        history = FileHistory(history_path())
    except OSError:
        history = InMemoryHistory()  # an unwritable home must not keep the shell from starting
    return PromptSession("ublk> ", history=history, completer=ShellCompleter(shell),
                         complete_style=CompleteStyle.READLINE_LIKE, complete_while_typing=False)


def history_path() -> str:
    """$XDG_STATE_HOME/ublkshell/history (~/.local/state/...): where state that outlives a
    session but is no one's configuration belongs. A history from the old place moves there."""
    base = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):  # the spec says a relative path is to be ignored
        base = os.path.expanduser("~/.local/state")
    path = os.path.join(base, "ublkshell", "history")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    st = os.lstat(os.path.dirname(path))
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        # someone else's directory could point the file anywhere we would write
        raise OSError(f"{os.path.dirname(path)} is not a private directory of ours")
    old = os.path.expanduser(OLD_HISTORY)
    if not os.path.lexists(path) and os.path.isfile(old) and not os.path.islink(old):
        os.replace(old, path)
    with open(path, "a"):
        pass
    return path


def banner(socket_path: str, started: bool) -> str:
    from .. import __version__

    try:
        with Client(socket_path, timeout=5) as c:
            hello = c.call("ping")
    except (UblkError, OSError):
        hello = {}
    tree = hello.get("mount") or "not mounted"
    how = "started it" if started else "running"
    return (f"ublkshell {__version__}: server pid {hello.get('pid', '?')} ({how}) at {socket_path}, "
            f"stats tree {tree}\n`help` lists the verbs, Tab completes, Ctrl-D leaves.")


def _connect(socket_path: str) -> bool:
    """Whether this call started the server."""
    if server_running(socket_path):
        return False
    if os.geteuid() != 0:
        from ..kernel.ctrl import CONTROL_PATH, NO_ACCESS_HINT

        # a user's own server serves their own devices, once the admin allowed them
        # (docs/security.md); say now what is missing rather than after a timeout
        if os.path.exists(CONTROL_PATH) and not os.access(CONTROL_PATH, os.R_OK | os.W_OK):
            raise UblkError(f"no ublkshell server answers at {socket_path}, and "
                            + NO_ACCESS_HINT.format(path=CONTROL_PATH))
    ensure_server(socket_path)
    return True


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
            started = _connect(socket_path)
        except UblkError as e:
            shell.error(e)
            return 1
        if not sys.stdin.isatty():
            return _script(shell)
        shell.print(banner(socket_path, started))
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
