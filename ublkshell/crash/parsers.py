"""The command line's parsers for `replay` (crash/replay.py runs it) and `mark` (crash/marks.py). commands.py adds it to
the one command table, as it adds devices/parsers.py's and faults/verbs.py's."""
import argparse

from ..devices import ids as devids
from .logdevice import MAX_MARK
from .replay import CHECK_AT


def add_parsers(sub) -> argparse.ArgumentParser:
    """`replay`; returned, for commands.py to say what Tab offers for its values."""
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
    return r
