"""The command line's parsers for `replay` (crash/replay.py runs it), `mark` (crash/marks.py) and
`crashtest` (crash/crashtest.py). commands.py adds it to
the one command table, as it adds devices/parsers.py's and faults/verbs.py's."""
import argparse

from ..devices import ids as devids
from .logdevice import MAX_MARK
from .replay import CHECK_AT


def add_parsers(sub) -> tuple:
    """`replay`, `mark` and `crashtest`; replay's and crashtest's parsers are returned, for
    commands.py to say what Tab offers for their values."""
    r = sub.add_parser(
        "replay", help="replay a dm-log-writes log onto a device or image, to any entry or mark",
        description=(
            "Write the entries of a dm-log-writes log (what the kernel's log-writes target, as\n"
            "fstests uses it, writes to its log device) onto TARGET in the order they were logged:\n"
            "writes as written, discards as zeroes, flushes and marks as points to stop or check at.\n"
            "Entries count from 0, as fstests' replay-log counts them. TARGET is a block device\n"
            "(opened exclusively: not one that is mounted) or an image file; --size makes a new\n"
            "sparse image. The log is only read."),
        epilog="examples:\n"
               "  ublkshell replay run1.log --list                      entries, flags, marks\n"
               "  ublkshell replay run1.log img --size 256M --to-mark after-mkfs\n"
               "  ublkshell replay run1.log /dev/sdX --to-entry 1200\n"
               "  ublkshell replay run1.log img --size 256M --check 'fsck.ext4 -fn {}'\n"
               "      runs the check after every flush and FUA write ({} is TARGET); the first\n"
               "      that fails stops the replay and prints the command that rebuilds that state",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("log", metavar="LOG")
    r.add_argument("target", metavar="TARGET", nargs="?")
    r.add_argument("--list", action="store_true", help="list the entries (to --to-entry/--to-mark) instead")
    r.add_argument("--to-entry", metavar="N", help="stop after entry N (counted from 0)")
    r.add_argument("--to-mark", metavar="NAME", help="stop at the first mark named NAME")
    r.add_argument("--size", metavar="SIZE", help="create TARGET, a new sparse image of SIZE (256M, 1G)")
    r.add_argument("--check", metavar="CMD",
                   help="run CMD (split as a shell would, run without one; {} is TARGET) at each "
                        "check point; it must exit 0")
    r.add_argument("--check-at", metavar="|".join(CHECK_AT), default="flush",
                   help="flush: after each flush or FUA write (default); mark: at each mark; "
                        "each: after every entry")
    r.add_argument("--skip", metavar="N,N,...",
                   help="leave these write or discard entries out (a crash state in which they never "
                        "reached the media; `crashtest` prints such commands)")
    r.add_argument("--json", action="store_true", help="JSON: one object per entry with --list, "
                                                       "else a summary")
    m = sub.add_parser(
        "mark", help="name a point in a device's write log (add --log-writes)",
        description=(
            "Append a mark named NAME to the device's write log, after every entry logged so far\n"
            "(writes still waiting for a flush come after it, as with dm-log-writes' `dmsetup\n"
            "message DEV 0 mark NAME`). Returns once the mark is in the file; prints its entry\n"
            "number. `replay LOG TARGET --to-mark NAME` rebuilds the device as it stood there."),
        epilog="examples:\n"
               "  ublkshell add -t mem --size 256M --log-writes /var/tmp/run1.log\n"
               "  mkfs.ext4 -q /dev/ublkb0 && sync && ublkshell mark 0 after-mkfs\n"
               "  ublkshell replay /var/tmp/run1.log img --size 256M --to-mark after-mkfs",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("id", type=devids.arg, metavar="ID")
    m.add_argument("name", metavar="NAME", help=f"up to {MAX_MARK} bytes")
    m.add_argument("--json", action="store_true")
    return r, add_crashtest_parser(sub)


def add_crashtest_parser(sub) -> argparse.ArgumentParser:
    from .crashtest import FS

    c = sub.add_parser(
        "crashtest", help="run a workload once, then check the file system in every crash state it allows",
        description=(
            "Make a file system on a new mem device that logs its writes (add --log-writes), run\n"
            "WORKLOAD in it once (its cwd and $UBLKSHELL_MNT are the mount, $UBLKSHELL_DEV the\n"
            "device), then, for every persistence point the log holds (each FLUSH and FUA write),\n"
            "build the images a crash before that point could leave: everything before the\n"
            "previous point plus a subset of the writes in between (every prefix, every single\n"
            "write dropped, --states random subsets). Each is mounted (the journal replays), given\n"
            "--check, unmounted and checked by the file system's checker (fsck.ext4 -fn,\n"
            "xfs_repair -n, btrfs check --readonly). The workload never runs again. The first\n"
            "failing state is printed with its epoch's writes and the `replay` command that\n"
            "rebuilds it. Exit status 1 when a state failed."),
        epilog="examples:\n"
               "  ublkshell crashtest -- sh -c 'for i in 1 2 3; do echo $i > f$i; sync f$i; mv f$i g$i; done'\n"
               "  ublkshell crashtest --mount-opts nobarrier -- sh -c 'cp -r /usr/share/doc/bash d; rm -r d'\n"
               "      (without barriers nothing orders the writes: expect failures)\n"
               "  ublkshell crashtest --check 'test ! -e g1 || grep -qx 1 g1' -- sh -c '...'\n"
               "      a state fails when the check fails in its mount ({} is the mount)\n"
               "  ublkshell crashtest --fs none --check './verify {}' -- ./my-db-commit \"$UBLKSHELL_DEV\"\n"
               "      no file system: the check gets each crash image\n"
               "(docs/crashtest.md: the model, what the bounds leave out)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--fs", default="ext4", metavar="|".join(FS), help="the file system (default ext4)")
    c.add_argument("--size", default="256M", help="the device (default 256M; 16M..64G)")
    c.add_argument("--mkfs-opts", default="", metavar="OPTS", help="more mkfs options, e.g. '-O ^has_journal'")
    c.add_argument("--mount-opts", default="", metavar="OPTS",
                   help="mount options for the workload and for every state, e.g. nobarrier")
    c.add_argument("--check", metavar="CMD",
                   help="run in each state's mount (cwd; {} is the mount; with --fs none, the image); "
                        "must exit 0. Split as a shell would, run without one")
    c.add_argument("--states", type=int, default=8, metavar="N",
                   help="random subsets tried per epoch, beside every prefix and every single drop (default 8)")
    c.add_argument("--max-states", type=int, default=2000, metavar="N", help="stop after N states (default 2000)")
    c.add_argument("--seed", type=int, default=0, help="the random subsets' seed (default 0)")
    c.add_argument("--jobs", type=int, metavar="N", help="states checked at once (default: the CPU count)")
    c.add_argument("--log", metavar="FILE", help="keep the write log as FILE (a new file; kept anyway when a "
                                                 "state fails)")
    c.add_argument("--workdir", metavar="DIR", help="where the images go (default $TMPDIR or /tmp): "
                                                    "size x (jobs + 1) of space")
    c.add_argument("--keep-going", action="store_true", help="check every state, not only up to the first "
                                                             "epoch that fails")
    c.add_argument("--json", action="store_true", help="a JSON summary on stdout (the workload's output "
                                                       "goes to stderr)")
    c.add_argument("workload", nargs=argparse.REMAINDER, metavar="-- WORKLOAD...")
    return c
