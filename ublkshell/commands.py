"""The one command table: every verb's options, defaults and help, parsed by the command
line (cli.py) and by the shell (repl/), which adds its own few verbs. The verbs' arguments
are then checked once more, by the same rules for every face, in verbs.call (validate.py)."""
import argparse

from . import __version__
from .crash.parsers import add_parsers as add_crash_parsers
from .devices import ids as devids
from .devices.parsers import add_parsers as add_device_parsers
from .devices.targets import TARGETS as target_table
from .errors import UsageError
from .faults.grammar import ACTIONS
from .faults.verbs import add_parsers as add_fault_parsers
from .observe.names import IO_OPS, MAX_DEPTH
from .observe.schema import SCHEMA_VERSION
from .observe.trace import TRACE_FORMATS

SHELL_ONLY = {
    "help": "this list, or `help VERB` for one verb's options",
    "quit": "leave the shell (also exit, Ctrl-D)",
    "exit": "leave the shell",
}
FAULT_VERBS = (*ACTIONS, "faults", "clear", "seed", "powercut")
SERVER_VERBS = ("add", "del", "list", "info", "features", "stats", "lat", "inflight", "metrics", *FAULT_VERBS)
# daemon death and recovery
SERVER_VERBS += ("kill", "recover")
# live changes
SERVER_VERBS += ("resize", "quiesce", "resume", "upgrade")
# the write log (add --log-writes)
SERVER_VERBS += ("mark",)
VERBS = (*SERVER_VERBS, "trace", "top", *SHELL_ONLY)
ID_VERBS = {"del", "stats", "lat", "inflight", "trace", "info", "top", *FAULT_VERBS}
# daemon death and recovery
ID_VERBS |= {"kill", "recover", "resize", "quiesce", "resume", "upgrade", "mark"}
RECOVERY_MODES = ("requeue", "reissue", "fail")
MULTI_ID_VERBS = {"del", "top"}
TARGETS = tuple(target_table)  # the native target table names them (native/targets.c)

EPILOG = """\
examples:
  ublkshell                                       interactive shell (Tab completes; starts the server if needed)
  ublkshell -c "stats 0"                          one shell line through the server, then exit
  ublkshell add -t loop -f disk.img -q 2 -d 128   serve disk.img as /dev/ublkbN
  ublkshell add -t mem --size 1G                  RAM-backed, sparse
  ublkshell add -t null --size 100G               completes at once, reads zeros
  ublkshell add --transport fuse -t mem --size 1G --loop
                                                  no ublk_drv? the same targets through FUSE + a loop device
  ublkshell list                                  what exists, who serves it
  ublkshell features                              what this kernel's ublk_drv can do
  ublkshell del 0 | ublkshell del -a              delete one device | all (FUSE ones: del fuse0)
  ublkshell add -t mem --size 1G --recovery       a device that survives its daemon ...
  ublkshell kill 0 && ublkshell recover 0         ... killed (IO waits), then served by a new one
  ublkshell stats 0                               IOs, bytes, errors, latency percentiles per op
  ublkshell lat 0 read                            latency histogram with percentiles
  ublkshell inflight 0                            tags being served now, with their age
  ublkshell trace 0 op=write min_lat=1ms          every IO as it completes, until Ctrl-C
  ublkshell record 0 -o run --duration 30s        blktrace files: blkparse -i run, btt (or --format fio-iolog)
  ublkshell replay run.log img --size 1G --to-mark M
                                                  a dm-log-writes log replayed to a mark, in img
  ublkshell crashtest --fs ext4 -- sh -c 'echo hi > f; sync'
                                                  the workload once, fsck in every crash state it allows
  ublkshell delay 0 5ms op=write                  every write to dev 0 takes 5 ms longer
  ublkshell fail 0 lba 2048..4095 op=read         reads of those sectors fail with EIO
  ublkshell faults 0 | ublkshell clear 0          list the fault rules (with hits) | remove them
  ublkshell demo                                  a mem device, ext4 on it, then gone
  ublkshell vm -- CMD...                          run CMD in the bundled VM (a kernel with ublk_drv)
  source <(ublkshell completion bash)             Tab completion in bash (zsh, installing: completion --help)

Each device is served by its own IO daemon process (logs under /run/ublkshell/log);
the command that created it may exit. ublk control needs root, or for another user the
admin's group and udev rule (docs/security.md, "Unprivileged devices").
"""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


# what `offer` takes for a value that is a path, not a word from a list
PATH, DIRECTORY = "<path>", "<directory>"
COMPLETION_SHELLS = ("bash", "zsh")


def offer(p: argparse.ArgumentParser, values: dict) -> None:
    """What Tab offers for the values of p's options and positionals (completions.py), by option
    string or dest: words, PATH, DIRECTORY, or None for the a|b|c its metavar shows. Never argparse's
    `choices`, which would refuse values itself: validate.py does, in the same words on every face."""
    for action in p._actions:
        for key in (*action.option_strings, action.dest):
            if key in values:
                words = values[key]
                action.offers = words if words is not None else tuple(action.metavar.split("|"))


def cli_parser() -> argparse.ArgumentParser:
    """The command line's verbs and options."""
    p = Parser(prog="ublkshell", description="Serve, watch and break Linux ublk block devices. "
                                            "Without a VERB: an interactive shell.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-V", "--version", action="version",
                   version=f"ublkshell {__version__} (JSON schema {SCHEMA_VERSION})")
    p.add_argument("-c", dest="command", metavar="COMMAND",
                   help="run one line of the interactive shell through the server and exit")
    # its own dest: `serve --socket` would overwrite a shared one with its default
    p.add_argument("--socket", dest="shell_socket", metavar="PATH",
                   help="the server's control socket, for the shell and -c "
                        "(default /run/ublkshell/ublkshell.sock)")
    sub = p.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)

    a = sub.add_parser("add", help="create a device served by a new IO daemon",
                       description="Create /dev/ublkbN and serve it from a new IO daemon process. "
                                   "On a kernel without ublk_drv, --transport fuse serves the same "
                                   "targets as a file in a FUSE mount (device ids fuse0, fuse1, ...), "
                                   "and --loop makes that file a block device (/dev/loopN).")
    a.add_argument("-t", "--type", required=True, metavar="TARGET",
                   help="; ".join(f"{name}: {t.help}" for name, t in target_table.items()))
    a.add_argument("-f", "--file", help="loop: the backing file or block device")
    a.add_argument("--size", help="device size, e.g. 512M, 1G (loop: defaults to the file's size)")
    a.add_argument("-q", "--queues", type=int, default=1, help="hardware queues, one thread each (default 1)")
    a.add_argument("-d", "--depth", type=int, default=128, help=f"tags per queue, 1..{MAX_DEPTH} (default 128)")
    a.add_argument("-n", "--number", type=int, default=-1,
                   help="device id to ask for (default: any free; with --transport fuse, N asks for fuseN)")
    a.add_argument("--block-size", help="logical block size: 512 (default), 1k, 2k, 4k")
    a.add_argument("--max-io", default="512k", help="largest single IO (default 512k)")
    a.add_argument("--powercut", action="store_true",
                   help="mem, loop: remember what unflushed writes overwrote (up to 256M), "
                        "so that `powercut ID` can forget them as a power loss would")
    a.add_argument("--no-records", action="store_true",
                   help="keep no IO records, counters or histograms (to measure what they cost); "
                        "fault rules still apply")
    a.add_argument("--transport", default="ublk", metavar="ublk|fuse",
                   help="ublk (default): /dev/ublkbN through the kernel's ublk_drv. fuse: for kernels "
                        "without it, the device is the file /run/ublkshell/fuse/fuseN/disk, served "
                        "by the same native targets, with the same stats and trace (one queue)")
    a.add_argument("--loop", action="store_true",
                   help="with --transport fuse: attach that file to a loop device with losetup, so "
                        "there is a block device to mkfs and mount; `add` prints it, `list` shows it, "
                        "`del` detaches it")
    a.add_argument("--recovery", nargs="?", const="requeue", metavar="MODE",
                   help="if the device's daemon dies, keep the device for `recover` (a new daemon): "
                        "requeue (the default MODE): IO waits meanwhile, IO the dead daemon held fails; "
                        "reissue: IO waits, IO the dead daemon held is issued again; "
                        "fail: IO fails at once (EREMOTEIO) until recovered")
    a.add_argument("--io-mode", default="auto", metavar="auto|batch|per-tag",
                   help="how requests and results cross to the kernel. batch: many tags per command "
                        "each way (UBLK_F_BATCH_IO, Linux 6.19+); per-tag: one command per IO; auto "
                        "(default): batch where the kernel offers it. `list` and `info` show the mode")
    a.add_argument("--coalesce", default="0", metavar="DURATION",
                   help="when a queue is busy (turns bring several IOs), let its wait for more "
                        "completions last up to DURATION (e.g. 200us, at most 10ms; a bare number "
                        "counts microseconds), so that one "
                        "io_uring_enter serves many IOs; fewer crossings at depth, more latency at "
                        "low depth. 0 (default): never wait (see docs/benchmarks.md)")
    a.add_argument("--zero-copy", default="auto", metavar="auto|on|off|fallback",
                   help="on: the kernel registers each READ's and WRITE's pages with the queue's "
                        "io_uring and loop and mem move them with fixed-buffer IO, never copying "
                        "through the daemon (UBLK_F_AUTO_BUF_REG, Linux 6.16+); IO a corrupt fault "
                        "edits still takes the copy path (`stats` counts it). auto (default): on for "
                        "loop on a file or device not in RAM, where the kernel offers it. off: the "
                        "driver copies. fallback: every registration fails on purpose, so every IO "
                        "takes the driver's fallback and the copy path (for testing that path)")
    a.add_argument("--zoned", action="store_true",
                   help="mem: a host-managed zoned device (UBLK_F_ZONED, Linux 6.6+): writes only at a "
                        "zone's write pointer (else EIO), zone open/close/finish/reset, zone append, "
                        "`blkzone report`; user copy, no zero copy")
    a.add_argument("--zone-size", metavar="SIZE",
                   help="--zoned: zone size, a power of two from 64k to 1T that divides --size (default 256M)")
    a.add_argument("--conv-zones", type=int, metavar="N",
                   help="--zoned: conventional zones (written anywhere) at the start (default 0)")
    a.add_argument("--max-open", type=int, metavar="N",
                   help="--zoned: most zones open at once (default: no limit)")
    a.add_argument("--max-active", type=int, metavar="N",
                   help="--zoned: most zones open or closed at once (default: no limit)")
    a.add_argument("--log-writes", metavar="FILE",
                   help="log every write the device completes, with its data, flushes and FUA, to "
                        "FILE (a new file) in dm-log-writes' format: `mark ID NAME` names points in "
                        "it, `replay FILE TARGET --to-mark NAME` rebuilds the device as it stood "
                        "there (docs/crashtest.md). Writes wait in memory for the next flush, as "
                        "dm-log-writes holds them")
    a.add_argument("--log-writes-memory", metavar="SIZE",
                   help="--log-writes: most write data held in memory, waiting for a flush or for "
                        "the log's disk (default 256M); past it logging stops (the log stays "
                        "valid up to there, `info` says why)")
    a.add_argument("--json", action="store_true", help="print the new device as JSON")
    offer(a, {"--type": TARGETS, "--file": PATH, "--log-writes": PATH, "--transport": None, "--recovery": RECOVERY_MODES,
              "--io-mode": None, "--zero-copy": None})

    d = sub.add_parser("del", help="delete devices",
                       description="Stop and delete ublk devices (and FUSE-transport ones: their loop "
                                   "device is detached, their mount removed).")
    d.add_argument("ids", nargs="*", type=devids.arg, metavar="ID", help="0, 1, ... or fuse0, ...")
    d.add_argument("-a", "--all", action="store_true", help="delete every device, ublk and FUSE")
    d.add_argument("--json", action="store_true", help="the devices deleted, by name, as JSON")

    ls = sub.add_parser("list", help="list devices",
                        description="List ublk devices, then FUSE-transport ones with their loop device "
                                    "and file (a dead one's mount and loop device are cleaned up here).")
    ls.add_argument("--json", action="store_true", help="machine-readable output")

    f = sub.add_parser("features", help="what the running kernel's ublk_drv supports",
                       description="Ask ublk_drv (UBLK_U_CMD_GET_FEATURES) what it supports.")
    f.add_argument("--json", action="store_true")

    st = sub.add_parser("stats", help="IO counters and latency percentiles of a device",
                        description="Counters and latency percentiles per op, from the device's "
                                    "shared memory (they survive a killed daemon).")
    st.add_argument("id", type=devids.arg)
    st.add_argument("--json", action="store_true")
    st.add_argument("--queues", action="store_true", help="one line per queue too")
    st.add_argument("--interval", default=None, metavar="DURATION",
                    help="a row per interval (1s, 500ms; a bare number is seconds) as iostat -x prints "
                         "it from the kernel's /sys/block stat (r/s w/s rMiB/s wMiB/s r_await w_await "
                         "aqu-sz %%util), beside the daemon's own service time (r_svc w_svc, ms): await "
                         "less svc is what the kernel and the queue added. Until Ctrl-C or --count")
    st.add_argument("--count", type=int, default=0, help="with --interval: stop after N rows")
    st.add_argument("--histograms", action="store_true",
                    help="with --json: each op's latency histogram too (buckets by lower bound, ns)")

    io = sub.add_parser("info", help="a device's line from `list` and its stats",
                        description="A device's line from `list` (target, size, queues, daemon, IO "
                                    "mode) and its stats, in one call.")
    io.add_argument("id", type=devids.arg, metavar="ID")
    io.add_argument("--json", action="store_true")

    top = sub.add_parser("top", help="IOPS, MiB/s, latency and in-flight per device and queue, refreshed",
                         description="A full-screen view, refreshed every --interval: per device and per "
                                     "queue and op, IOPS and MiB/s, the daemon's service time (avg, p50, "
                                     "p99, p99.9) of the IOs that completed in the interval, and tags in "
                                     "flight now. q or Ctrl-C leaves. When the output is not a terminal, "
                                     "or with --batch, it prints a plain frame per interval instead "
                                     "(as top -b).",
                         epilog="examples:\n  ublkshell top\n  ublkshell top 0 fuse1 --interval 500ms\n"
                                "  ublkshell top --batch --count 5 > top.log")
    top.add_argument("ids", nargs="*", type=devids.arg, metavar="ID", help="devices to show (default: all)")
    top.add_argument("--interval", default="1s",
                     help="time between refreshes: 500ms, 2s, 1m; a bare number is seconds (default 1s)")
    top.add_argument("--count", type=int, default=0,
                     help="print N plain frames, then exit (default: full screen until q or Ctrl-C)")
    top.add_argument("-b", "--batch", action="store_true", help="plain frames, one after another")

    lt = sub.add_parser("lat", help="latency histogram of a device",
                        description="Latency histogram (log-linear buckets, ~3% precision) with percentiles.")
    lt.add_argument("id", type=devids.arg)
    lt.add_argument("op", nargs="?", default="read", help="read (default), write, flush, discard, write_zeroes")
    lt.add_argument("--json", action="store_true")
    offer(lt, {"op": IO_OPS})

    inf = sub.add_parser("inflight", help="tags being served now",
                         description="Tags the daemon is serving now, per queue, with their age and request.")
    inf.add_argument("id", type=devids.arg)
    inf.add_argument("--json", action="store_true")

    me = sub.add_parser("metrics", help="every device's counters for Prometheus",
                        description="Every device's counters, in-flight IOs, latency histogram (the "
                                    "daemon's service time), fault rule hits and daemon recoveries in "
                                    "the Prometheus text format (node_exporter's textfile collector "
                                    "reads it), or OpenMetrics. The stats tree has it as /mnt/ublkstats/metrics.",
                        epilog="example: ublkshell metrics > /var/lib/node_exporter/ublkshell.prom.$$ && "
                               "mv /var/lib/node_exporter/ublkshell.prom.$$ /var/lib/node_exporter/ublkshell.prom")
    me.add_argument("--format", default="prometheus", metavar="prometheus|openmetrics")
    offer(me, {"--format": None})
    me.add_argument("--json", action="store_true", help="the text inside a JSON object")

    tr = sub.add_parser("trace", help="stream every IO as it completes",
                        description="Stream completed IOs: time q tag op flags sector+sectors latency result. "
                                    "Filters: q=N tag=N op=read|write|flush|discard|write_zeroes (or several: op=write,flush) "
                                    "lba=A..B (sectors) min_lat=1ms errors. Ctrl-C ends it.")
    tr.add_argument("id", type=devids.arg)
    tr.add_argument("filters", nargs="*", metavar="FILTER")
    tr.add_argument("--json", action="store_true", help="one JSON object per line (--format json)")
    tr.add_argument("--format", default=None, metavar="FORMAT",
                    help="text (default); json; blkparse: the line blkparse prints for each "
                         "completion (C), then tag=, lat= and the fault; fio-iolog: an fio iolog v3 "
                         "in the order the IOs began (`record` writes either to files)")
    _trace_stops(tr)
    offer(tr, {"--format": TRACE_FORMATS})

    rec = sub.add_parser(
        "record", help="write a device's IO to files blkparse, btt or fio read",
        description=(
            "Record a device's completed IOs until Ctrl-C, --count or --duration, to files other\n"
            "tools read. Filters as for trace. Files are made mode 0600, never through a symlink.\n\n"
            "blktrace (default): OUT.blktrace.0 .. OUT.blktrace.N-1, one per queue as blktrace\n"
            "writes one per CPU, for `blkparse -i OUT` and btt. Each IO is a Q and a D event when\n"
            "the driver handed it to the daemon and a C event when the daemon committed it, so\n"
            "btt's D2C is the daemon's service time.\n\n"
            "fio-iolog: the file OUT, an fio iolog v3 in the order the IOs began; `fio\n"
            "--read_iolog=OUT --replay_redirect=DEV` replays it. Write-zeroes, which fio cannot\n"
            "issue, are left out and counted."),
        epilog="examples:\n"
               "  ublkshell record 0 -o /var/tmp/run --duration 30s\n"
               "  blkparse -i /var/tmp/run; blkparse -q -i /var/tmp/run -d run.bin && btt -i run.bin\n"
               "  ublkshell record 0 -o job.iolog --format fio-iolog op=write\n"
               "  fio --name=again --read_iolog=job.iolog --replay_redirect=/dev/ublkb1",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    rec.add_argument("id", type=devids.arg)
    rec.add_argument("filters", nargs="*", metavar="FILTER")
    rec.add_argument("-o", "--output", required=True, metavar="OUT",
                     help="blktrace: the files' common start (OUT.blktrace.Q); fio-iolog: the file")
    rec.add_argument("--format", default="blktrace", metavar="blktrace|fio-iolog")
    rec.add_argument("--force", action="store_true", help="replace files that exist")
    rec.add_argument("--json", action="store_true", help="print what was written as JSON")
    _trace_stops(rec)
    offer(rec, {"--output": PATH, "--format": None})

    replay, crashtest = add_crash_parsers(sub)
    offer(replay, {"log": PATH, "target": PATH, "--check-at": None})
    offer(crashtest, {"--fs": None, "--log": PATH, "--workdir": PATH})
    add_device_parsers(sub)

    demo = sub.add_parser("demo", help="a mem device with ext4 on it, end to end",
                          description="Create a mem device, put ext4 on it, write and check files, "
                                      "run fio verify, delete it. Uses the bundled VM when this "
                                      "kernel has no ublk_drv.")
    demo.add_argument("--size", default="256M")
    demo.add_argument("--no-vm", action="store_true",
                      help="without ublk_drv, serve the device through the FUSE transport and a loop "
                           "device here instead of booting the VM")

    sv = sub.add_parser("serve", help="run the server (socket, stats tree, daemon watch) in the foreground",
                        description="Run the ublkshell server: an owner-only control socket (JSON lines, "
                                    "docs/protocol.md), the FUSE stats tree, and a watch on every device "
                                    "daemon. The devices belong to their own daemons: SIGTERM (or a crash) "
                                    "stops the server and leaves them running, and a new server adopts "
                                    "them. --delete-devices deletes them on a clean stop instead.")
    sv.add_argument("--socket", default=None, help="control socket (default /run/ublkshell/ublkshell.sock)")
    sv.add_argument("--mount", default=None,
                    help="where to mount the stats tree (default /mnt/ublkstats; a user who is not root: "
                         "STATE/stats in their own state dir)")
    sv.add_argument("--no-fuse", action="store_true", help="do not mount the stats tree")
    sv.add_argument("--delete-devices", action="store_true",
                    help="delete every device when the server is stopped (SIGTERM, `shutdown`)")
    # the default since devices outlive the server; still accepted from older scripts
    sv.add_argument("--keep-devices", action="store_true", help=argparse.SUPPRESS)
    sv.add_argument("--auto-recover", action="store_true",
                    help="when the daemon of a device added with --recovery dies, start a new one")
    offer(sv, {"--socket": PATH, "--mount": DIRECTORY})

    add_fault_parsers(sub)
    _completion_verb(sub)
    offer(p, {"--socket": PATH})
    sub.add_parser("vm", help="run a command inside the bundled VM (kernel with ublk_drv)",
                   add_help=False)
    return p




def _completion_verb(sub) -> None:
    c = sub.add_parser(
        "completion", help="print a bash or zsh completion script",
        description="Print a script that teaches bash or zsh to complete ublkshell's verbs, their "
                    "options, the values those take, and the ids of the devices that exist "
                    "(ublk: /sys/class/ublk-char; FUSE: /run/ublkshell/fuse, root only).",
        epilog="install, bash (bash-completion loads it in every new shell):\n"
               "  ublkshell completion bash > /etc/bash_completion.d/ublkshell\n"
               "  or, for yourself, in ~/.bashrc:  source <(ublkshell completion bash)\n"
               "install, zsh (a directory of $fpath, read by compinit in every new shell):\n"
               "  ublkshell completion zsh > \"${fpath[1]}/_ublkshell\"\n"
               "  then start a new zsh (exec zsh)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("shell", metavar="|".join(COMPLETION_SHELLS))
    offer(c, {"shell": None})


def _trace_stops(p: argparse.ArgumentParser) -> None:
    p.add_argument("--count", type=int, default=0, help="stop after N records")
    p.add_argument("--duration", default="", help="stop after this long: 10s, 500ms, 1m; a bare number is seconds")
    p.add_argument("--from-start", action="store_true",
                   help="begin with the records still in the rings, not only new ones")


def args_of(args) -> dict:
    """argparse namespace -> the verb's argument dict (the same keys the server takes)."""
    a = dict(vars(args))
    for k in ("verb", "command", "shell_socket"):
        a.pop(k, None)
    if args.verb == "add":
        a["target"] = a.pop("type")
        a["dev_id"] = a.pop("number")
    if args.verb == "stats" and not a.get("interval"):
        # a one-shot stats (what the server takes); --interval is the command line's own loop
        a.pop("interval", None)
        if a.pop("count", None):
            raise UsageError("stats: --count goes with --interval (stats ID --interval 1 --count 5)")
    elif args.verb == "stats" and a.pop("histograms", False):
        raise UsageError("stats: --histograms goes with a one-shot --json, not --interval")
    return a


def subparsers(p: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))


def shell_parser() -> argparse.ArgumentParser:
    """The CLI's parser plus the verbs only the shell has."""
    p = cli_parser()
    sub = subparsers(p)
    h = sub.add_parser("help", help=SHELL_ONLY["help"], description="List the verbs, or show one verb's help.")
    h.add_argument("topic", nargs="?", metavar="VERB")
    sub.add_parser("quit", help=SHELL_ONLY["quit"], description="Leave the shell.")
    sub.add_parser("exit", help=SHELL_ONLY["exit"], description="Leave the shell.")
    # inside the shell a verb's usage line reads `stats ID`, not `ublkshell stats ID`
    for name, sp in sub.choices.items():
        sp.prog = name
    return p
