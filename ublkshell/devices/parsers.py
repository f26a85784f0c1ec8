"""The command line's parsers for the verbs that act on a device's daemon or its
geometry: daemon death and recovery (kill, recover) and live changes (resize, quiesce,
resume, upgrade). commands.py adds them to the one command table, as it adds faults/verbs.py's."""
from . import ids as devids


def add_parsers(sub) -> None:
    _recovery(sub)
    _live(sub)


def _recovery(sub) -> None:
    k = sub.add_parser("kill", help="SIGKILL a device's IO daemon (the kernel's abort path)",
                       description="SIGKILL the device's IO daemon and wait until the kernel reacts. "
                                   "Without --recovery the kernel fails the IO in flight with EIO and "
                                   "removes the disk (DEAD; an fd still open sees size 0) until `del ID`; "
                                   "with --recovery the device waits for `recover ID`: QUIESCED (IO "
                                   "waits), or FAIL_IO with --recovery=fail (IO fails).")
    k.add_argument("id", type=devids.arg, metavar="ID")
    k.add_argument("--json", action="store_true")
    r = sub.add_parser("recover", help="a new IO daemon for a device whose daemon died",
                       description="Start a new IO daemon for a device added with --recovery whose "
                                   "daemon is gone: START_USER_RECOVERY, the same backing store "
                                   "(mem data, loop file) and statistics, every tag fetched, "
                                   "END_USER_RECOVERY. IO that waited resumes.")
    r.add_argument("id", type=devids.arg, metavar="ID")
    r.add_argument("--json", action="store_true")


def _live(sub) -> None:
    rs = sub.add_parser("resize", help="grow or shrink a live device",
                        description="Change a live device's size (UBLK_U_CMD_UPDATE_SIZE, Linux 6.16+). "
                                    "mem grows its memory (and gives it back when shrunk); loop grows its "
                                    "file, sparse, and never truncates it. Shrinking below a filesystem "
                                    "is refused: ext2/3/4's size is read from its super block, any other "
                                    "filesystem or partition table is refused as one whose size cannot be "
                                    "checked. Grow the filesystem afterwards (resize2fs, xfs_growfs).",
                        epilog="examples:\n  ublkshell resize 0 2G && resize2fs /dev/ublkb0\n"
                               "  ublkshell resize 0 +512M\n  ublkshell resize 0 1G --force")
    rs.add_argument("id", type=devids.arg, metavar="ID")
    rs.add_argument("size", metavar="SIZE", help="the new size (1G, 512M), or +SIZE to grow by SIZE")
    rs.add_argument("--force", action="store_true", help="shrink even below a filesystem")
    rs.add_argument("--json", action="store_true")

    qs = sub.add_parser("quiesce", help="hold a device's IO and let its daemon finish and leave",
                        description="QUIESCE_DEV (Linux 6.16+, a device added with --recovery): the kernel "
                                    "holds new IO, the daemon finishes every IO it holds and exits, and the "
                                    "device waits (QUIESCED) until `resume ID` starts a new daemon. "
                                    "Nothing fails, unlike `kill`. A hang rule's withheld IO would never "
                                    "finish: `clear` it first. Per-tag IO only (--io-mode per-tag): on "
                                    "batch IO the kernel fails the IO it queues meanwhile.")
    qs.add_argument("id", type=devids.arg, metavar="ID")
    qs.add_argument("--timeout", default="30s", help="how long the IO in flight may take (default 30s)")
    qs.add_argument("--json", action="store_true")
    rm = sub.add_parser("resume", help="end a quiesce: a new daemon serves the IO that waited",
                        description="For a device `quiesce` left waiting: start a new daemon (recover), "
                                    "which serves the IO that waited, then check the kernel's requeue "
                                    "list drained. A device whose daemon died is `recover`ed instead.",
                        epilog="example: ublkshell quiesce 0 && cp new-data ... && ublkshell resume 0")
    rm.add_argument("id", type=devids.arg, metavar="ID")
    rm.add_argument("--json", action="store_true")
    up = sub.add_parser("upgrade", help="replace a device's daemon with a new one, failing no IO",
                        description="quiesce, then recover: a daemon started now (the code installed now) "
                                    "takes the device over from the old one after it finished its IO; IO "
                                    "issued meanwhile waits and then goes to the new daemon. Needs a device "
                                    "added with --recovery --io-mode per-tag on Linux 6.16+. Caution: on 7.3.4, about one "
                                    "hand-over in 40 under load leaves the IO that waited stuck on the "
                                    "kernel's requeue list; upgrade checks that list (debugfs) and hands "
                                    "over again, but has not been seen to end that state (docs/design.md).",
                        epilog="example: pip install -U ublkshell && ublkshell upgrade 0")
    up.add_argument("id", type=devids.arg, metavar="ID")
    up.add_argument("--timeout", default="30s", help="how long the old daemon's IO may take (default 30s)")
    up.add_argument("--json", action="store_true")
