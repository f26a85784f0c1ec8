"""The JSON every face shows (`--json`, the socket's results, the stats tree's .json
twins), described once, as data: each kind of object, its keys, their types, units and
meaning. `check(kind, obj)` holds a real output to it (the tests do, on every face), and
`python -m ublkshell.observe.schema > docs/schema.md` writes the reference from it (a test
fails when the committed file differs).

This file is longer than 420 lines: it is one table, and splitting it would make two
places to look for one answer.

Types, as written in the table: int, uint (>= 0), num (int or float), str, bool, obj (any
object), any; `T?` may be null; `[T]` a list; `{op: T}` an object with one key per op
(read, write, flush, discard, write_zeroes, other); `{str: T}` an object with any keys;
`@kind` another kind of this table."""
import re
import sys
from typing import NamedTuple

from .names import OPS

# bumped when a key is removed or renamed or its type or meaning changes; new keys do not bump it
SCHEMA_VERSION = 1


class F(NamedTuple):
    type: str
    meaning: str
    unit: str = ""
    when: str | None = None  # present only then; None: always present


class Kind(NamedTuple):
    title: str
    faces: tuple  # where it is seen; () for a part of other kinds
    fields: dict | str  # {key: F}, or a type for what is not an object
    doc: str = ""


DEVICE = F("str", "the device, as you type it: `0` (/dev/ublkb0), `fuse0` (a FUSE-transport device)")
HANDLE = F("int", "the server's handle for the device: the ublk id, or 1048576 + N for fuseN "
                  "(every verb and the socket take `name` too)")
NAME = F("str", "the device, as you type it: `0`, `fuse0`")
TRANSPORT = F("str", "`ublk` or `fuse`")
FAULT = F("str?", "the fault rule that acted on the IO, as `action#rule` (`delay#3`); null: none")
QUEUE = F("uint", "hardware queue")
NS = "ns"

_PCT = {f"p{k}_ns": F("uint", f"{p}th percentile of the latency (its bucket's midpoint, at most max_ns)", NS)
        for k, p in (("50", "50"), ("90", "90"), ("99", "99"), ("999", "99.9"))}
OP_SUMMARY = {
    "ios": F("uint", "IOs completed", "IOs"),
    "bytes": F("uint", "data moved", "bytes"),
    "errors": F("uint", "IOs completed with an error", "IOs"),
    "avg_ns": F("uint", "mean latency: the daemon's service time, hand-over to commit", NS),
    "max_ns": F("uint", "longest latency seen", NS),
    **_PCT,
}
BUCKETS = F("[@bucket]", "the non-empty latency buckets (log-linear, about 3% wide), lowest first")
LATENCY_OP = {**OP_SUMMARY, "buckets": BUCKETS}
TAG = {
    "queue": QUEUE, "tag": F("uint", "the tag (slot) within the queue"),
    "op": F("str", "read, write, flush, discard, write_zeroes, or opN"),
    "flags": F("[str]", "the request's flags: fua, preflush, nounmap, ..."),
    "sector": F("uint", "first sector", "512-byte sectors"),
    "sectors": F("uint", "length", "512-byte sectors"),
}
RECORD = {
    "device": DEVICE, **TAG,
    "t_ns": F("uint", "when the daemon took the IO, since the statistics were created", NS),
    "lat_ns": F("uint", "the daemon's service time, hand-over to commit", NS),
    "result": F("int", "what was handed back: bytes done, 0, or a negative errno"),
    "fault": FAULT,
}
QUEUE_STATS = {
    "device": DEVICE, "queue": QUEUE,
    "inflight": F("uint", "IOs being served now", "IOs"),
    "ops": F("{op: @op_summary}", "per op"),
    "ring": F("@ring", "what the IO cost in crossings"),
}
RULE_FIELDS = {
    "id": F("uint", "the rule's id (never reused on the device)"),
    "text": F("str", "the rule as `faults` shows it, without the action's device"),
    "hits": F("uint", "IOs it acted on", "IOs"),
    "action": F("str", "delay, fail, drop, corrupt, torn, hang, flakey, badblocks"),
    "q": F("int", "only this queue; -1: any"), "tag": F("int", "only this tag; -1: any"),
    "ops": F("[str]", "only these ops; empty: any"),
    "lba": F("[uint]?", "only IOs touching this sector range [first, last]", "512-byte sectors"),
    "size": F("[uint]?", "only IOs of a size in [low, high]", "bytes"),
    "fua": F("bool", "only FUA writes"),
    "p": F("num?", "probability of acting on a matching IO; null: always"),
    "count": F("int", "acts this many times, then stops; -1: no limit"),
    "errno": F("uint", "the errno the rule's IOs fail with (errno=); 0: the action's own (EIO)"),
    "byte": F("int", "corrupt: the byte flipped; -1: a random one"),
    "sectors": F("uint", "torn: sectors a torn write keeps", "512-byte sectors"),
    "delay": F("[uint]?", "delay: [low, high]", NS),
    "up": F("uint?", "flakey: time up", NS), "down": F("uint?", "flakey: time down", NS),
    "mode": F("str", "flakey: `error` or `drop` while down"),
    "left": F("uint", "what is left of count=", "IOs", when="when the rule has count="),
    "healed": F("uint", "distinct sectors rewritten since", "sectors", when="on badblocks rules"),
    "heal_lost": F("uint", "rewrites the full heal log could not keep", "IOs", when="on badblocks rules"),
}
UBLK_ONLY, FUSE_ONLY = "on ublk devices", "on FUSE-transport devices"
ENTRY = {
    "id": HANDLE, "name": NAME, "transport": TRANSPORT,
    "pid": F("int", "the IO daemon's pid"), "pid_start": F("uint?", "its start time (/proc), to tell a successor"),
    "target": F("str", "null, mem, loop, pattern, ..."),
    "describe": F("str", "the target and its store, for people"),
    "size": F("uint", "device size", "bytes"), "block_size": F("uint", "logical block size", "bytes"),
    "queues": F("uint", "hardware queues"), "depth": F("uint", "tags per queue"),
    "max_io": F("uint", "largest IO", "bytes"), "flags": F("uint", "UBLK_F_* flags the device has (0 on FUSE)"),
    "spec": F("obj", "what `add` was asked (its options)"),
    "log": F("str", "the daemon's log file"), "stats": F("str", "the statistics file"),
    "started": F("num", "when the daemon started serving", "s since the epoch"),
    "recovery": F("str?", "requeue, reissue, fail; null: no recovery", when=UBLK_ONLY),
    "io_mode": F("str", "batch or per-tag", when=UBLK_ONLY),
    "zero_copy": F("bool", "the kernel registers request pages (UBLK_F_AUTO_BUF_REG)", when=UBLK_ONLY),
    "recoveries": F("uint", "daemons that took over after one died", when=UBLK_ONLY),
    "abandoned": F("uint", "IOs the dead daemon was serving at the last recovery", "IOs", when=UBLK_ONLY),
    "killed_pid": F("int", "the daemon `kill` killed", when="after `kill`"),
    "killed_at": F("num", "when", "s since the epoch", when="after `kill`"),
    "quiesced_pid": F("int", "the daemon `quiesce` let go", when="after `quiesce`"),
    "quiesced_at": F("num", "when", "s since the epoch", when="after `quiesce`"),
    "mount": F("str", "the FUSE mount", when=FUSE_ONLY), "file": F("str", "the device's file", when=FUSE_ONLY),
    "loop": F("str?", "its loop device (add --loop)", when=FUSE_ONLY),
    "loop_seq": F("uint?", "that loop device's diskseq", when=FUSE_ONLY),
    "mem_path": F("str?", "mem: the data file", when="with the mem target"),
    "zones_path": F("str?", "mem --zoned: the zone state file beside the data", when="on zoned devices"),
    "zoned": F("obj", "the zone geometry: zone_size (bytes), zones, conv_zones, max_open, max_active "
               "(0: no limit)", when="on zoned devices"),
    "direct_io": F("bool", "loop: the store is opened O_DIRECT", when="with the loop target"),
    "in_memory": F("bool", "loop: the store lives in RAM (tmpfs)", when="with the loop target"),
    "file_id": F("[uint]", "loop: the store's [st_dev, st_ino], which `resize` grows",
                 when="with the loop target"),
}
LIST_ENTRY = {
    "id": HANDLE, "name": NAME, "transport": TRANSPORT,
    "state": F("str", "LIVE, QUIESCED, FAIL_IO, DEAD (the kernel's; FUSE: LIVE or DEAD)"),
    "queues": F("uint", "hardware queues"), "depth": F("uint?", "tags per queue"),
    "max_io": F("uint?", "largest IO", "bytes"), "pid": F("int", "the IO daemon's pid"),
    "daemon_alive": F("bool", "that daemon runs"), "flags": F("[str]", "the kernel's feature flags, by name"),
    "size": F("uint?", "device size; null: unknown", "bytes"),
    "block_size": F("uint?", "logical block size", "bytes"),
    "target": F("str", "the target and its store (`-`: not ours)"),
    "recovery": F("str?", "requeue, reissue, fail; null: none (always null on FUSE)"),
    "io_mode": F("str?", "batch or per-tag; null on FUSE"),
    "zero_copy": F("bool", "the kernel registers request pages (false on FUSE)"),
    "file": F("str?", "the FUSE device's file; null on ublk"), "mount": F("str?", "its FUSE mount; null on ublk"),
    "loop": F("str?", "its loop device; null on ublk or without --loop"),
    "zoned": F("obj?", "zoned (UBLK_F_ZONED): zone_size (bytes), zones, conv_zones, max_open, max_active "
               "(0: no limit); null: not zoned"),
}
INFO = {
    "id": HANDLE, "name": NAME, "transport": TRANSPORT,
    "target": F("str?", "the target"), "describe": F("str?", "the target and its store"),
    "size": F("uint?", "device size", "bytes"), "block_size": F("uint?", "logical block size", "bytes"),
    "queues": F("uint?", "hardware queues"), "depth": F("uint?", "tags per queue"),
    "pid": F("int?", "the IO daemon's pid"), "daemon_alive": F("bool", "that daemon runs"),
    "flags": F("uint", "UBLK_F_* flags (0 on FUSE)"), "flag_names": F("[str]", "the same, by name"),
    "recovery": F("str?", "requeue, reissue, fail; null: none"),
    "recoveries": F("uint", "daemons that took over after one died"),
    "io_mode": F("str?", "batch or per-tag; null on FUSE"), "zero_copy": F("bool", "zero copy is on"),
    "file": F("str?", "the FUSE device's file; null on ublk"), "mount": F("str?", "its FUSE mount; null on ublk"),
    "loop": F("str?", "its loop device; null on ublk or without --loop"),
}

KINDS = {
    # -- devices ---------------------------------------------------------------
    "list": Kind("Devices", ("list --json", "socket list"), "[@list_entry]"),
    "list_entry": Kind("One device in `list`", (), LIST_ENTRY,
                       "`id` is the server's handle; scripts should name a device by `name`."),
    "device_entry": Kind("A device's registry entry", ("add --json", "socket add", "tree params.json"), ENTRY,
                         "What the daemon recorded about itself (/run/ublkshell/devices/NAME.json)."),
    "recover": Kind("A recovered device", ("recover --json", "socket recover"),
                    {**ENTRY, "old_pid": F("int?", "the dead daemon's pid"),
                     "seconds": F("num", "how long the recovery took", "s")}),
    "kill": Kind("A killed daemon", ("kill --json", "socket kill"),
                 {"id": HANDLE, "device": DEVICE, "pid": F("int", "the daemon killed"),
                  "daemon_gone": F("bool", "it has exited"),
                  "state": F("str", "the kernel's state after: QUIESCED, FAIL_IO, DEAD, LIVE, GONE"),
                  "recovery": F("str?", "the device's recovery mode"),
                  "seconds": F("num", "from the signal to the kernel's reaction", "s")}),
    "resize": Kind("A resized device", ("resize --json", "socket resize"),
                   {"device": DEVICE, "block": F("str", "its block device"),
                    "old_size": F("uint", "the size before", "bytes"), "size": F("uint", "the size now", "bytes"),
                    "filesystem": F("str?", "the filesystem found on a device shrunk without --force")}),
    "quiesce": Kind("A daemon that finished its IO and left", ("quiesce --json", "socket quiesce"),
                    {"device": DEVICE, "pid": F("int", "the daemon that left"),
                     "state": F("str", "the kernel's state after (QUIESCED)"),
                     "seconds": F("num", "until it had left", "s")}),
    "resume": Kind("A quiesced device served again", ("resume --json", "socket resume"),
                   {**ENTRY, "old_pid": F("int?", "the daemon `quiesce` let go"),
                    "seconds": F("num", "how long the new daemon took to start", "s"),
                    "requeued": F("uint?", "requests left on the requeue list (0: drained; null: no debugfs)")}),
    "upgrade": Kind("A daemon replaced by a new one", ("upgrade --json", "socket upgrade"),
                    {"device": DEVICE, "old_pid": F("int", "the daemon replaced"),
                     "pid": F("int", "the new daemon"),
                     "recoveries": F("uint", "daemons that took over, this one included"),
                     "quiesce_seconds": F("num", "until the old one had finished its IO", "s"),
                     "retries": F("uint", "hand-overs done again because requests stayed requeued"),
                     "requeued": F("uint?", "requests on the requeue list after (null: no debugfs)"),
                     "seconds": F("num", "the whole hand-over", "s")}),
    "del": Kind("Deleted devices", ("del --json", "socket del"),
                {"deleted": F("[str]", "the devices deleted, by name"), "all": F("bool", "`del -a`")}),
    "features": Kind("What the kernel's ublk_drv offers", ("features --json", "socket features"),
                     {"mask": F("uint", "UBLK_U_CMD_GET_FEATURES"),
                      "features": F("{str: bool}", "each UBLK_F_* flag by name: offered")}),
    "info": Kind("A device in one call", ("info --json", "socket info"),
                 {"device": DEVICE, "list": F("@list_entry?", "its `list` entry; null: not among the devices"),
                  "stats": F("@stats?", "its stats; null: none"), "error": F("str?", "why one is missing"),
                  "log_writes": F("@log_writes", "its write log", when="with add --log-writes")}),
    "log_writes": Kind("A device's write log (add --log-writes)", (), {
        "path": F("str", "the log file"),
        "status": F("@log_status?", "null: its daemon has no log open (gone, or never started)")}),
    "log_status": Kind("What the device's daemon says of its write log", (), {
        "entries": F("uint", "entries the log's super block counts"),
        "bytes": F("uint", "the log file's length", "bytes"),
        "held": F("uint", "write data in the daemon's memory now, waiting for a flush or the disk", "bytes"),
        "held_max": F("uint", "the most there ever was", "bytes"),
        "memory": F("uint", "the bound on held (--log-writes-memory)", "bytes"),
        "marks": F("uint", "marks logged"),
        "error": F("str?", "why logging stopped; null: it goes on")}),
    "tree_info": Kind("A device, for the tree", ("tree info.json",), INFO, "The same numbers as the `info` text."),
    # -- statistics ------------------------------------------------------------
    "stats": Kind("Counters and latency of a device", ("stats --json", "socket stats", "tree stats.json"),
                  {"device": DEVICE, "inflight": F("uint", "IOs being served now", "IOs"),
                   "ops": F("{op: @op_summary}", "per op, all queues"),
                   "ring": F("@ring", "what the IO cost in crossings, all queues"),
                   "queues": F("[@queue_stats]", "the same per queue")}),
    "queue_stats": Kind("Counters and latency of one queue", ("tree queues/N/stats.json",), QUEUE_STATS,
                        "The same object is each entry of `stats`' `queues`."),
    "op_summary": Kind("One op's counters and latency", (),
                       {**OP_SUMMARY, "buckets": F("[@bucket]", BUCKETS.meaning, when="with stats --histograms"),
                        "lat_sum_ns": F("uint", "the latencies' sum (two results give an interval's mean)", NS,
                                        when="with stats --histograms")}),
    "bucket": Kind("A latency bucket", (),
                   {"low_ns": F("uint", "lower bound (inclusive)", NS),
                    "high_ns": F("uint", "upper bound (exclusive)", NS),
                    "count": F("uint", "IOs in it", "IOs")},
                   "Text faces regroup these by power of two to fit a screen; the JSON has them all. "
                   "The last bucket (about 137 s and over) is open: its high_ns is its low_ns."),
    "ring": Kind("IO cost in crossings", (),
                 {"enters": F("uint", "io_uring_enter calls"), "cqes": F("uint", "completions reaped"),
                  "fetches": F("uint", "completions that brought requests"),
                  "commits": F("uint", "commands that took results back"),
                  "committed": F("uint", "IOs those carried", "IOs"),
                  "copied": F("uint", "IOs of a zero-copy device that took the copy path", "IOs"),
                  "enters_per_io": F("num?", "enters / committed; null: no IO"),
                  "cqes_per_enter": F("num?", "cqes / enters; null: no enter"),
                  "ios_per_commit": F("num?", "committed / commits; null: no commit")}),
    "lat": Kind("One op's latency histogram", ("lat --json", "socket lat"),
                {"device": DEVICE, "op": F("str", "the op"), **LATENCY_OP}),
    "latency": Kind("Every op's latency histogram", ("tree latency.json",),
                    {"device": DEVICE, "ops": F("{op: @latency_op}", "per op (each as `lat --json`)")}),
    "latency_op": Kind("One op in latency.json", (), LATENCY_OP),
    "inflight": Kind("Tags being served", ("inflight --json", "socket inflight", "tree inflight.json"),
                     {"device": DEVICE, "tags": F("[@tag]", "oldest first"),
                      "waiting": F("uint?", "requests the block layer holds beyond these tags: IO "
                                   "waiting for a daemon (quiesced, or dead with --recovery); null on FUSE",
                                   "IOs")}),
    "queue_inflight": Kind("Tags being served by one queue", ("tree queues/N/inflight.json",),
                           {"device": DEVICE, "queue": QUEUE, "tags": F("[@tag]", "oldest first")}),
    "tag": Kind("A tag in flight", (),
                {**TAG, "age_ns": F("uint", "since the daemon took it", NS), "fault": FAULT}),
    "stats_row": Kind("An interval of `stats --interval`", ("stats ID --interval T --json",),
                      {"device": DEVICE, "block": F("str?", "the /sys/block name; null: no block device"),
                       "interval_s": F("num", "the interval's length", "s"),
                       **{c: F("num?", "as iostat -x prints it; null: no block device", u) for c, u in (
                           ("r/s", "IOs/s"), ("w/s", "IOs/s"), ("rMiB/s", "MiB/s"), ("wMiB/s", "MiB/s"),
                           ("r_await", "ms"), ("w_await", "ms"), ("aqu-sz", "requests"), ("%util", "%"))},
                       "r_svc": F("num", "the daemon's mean read service time in the interval", "ms"),
                       "w_svc": F("num", "the same for writes", "ms")},
                      "One per line, each interval; the kernel's columns come from /sys/block/BLOCK/stat."),
    "metrics": Kind("Prometheus text", ("metrics --json", "socket metrics"),
                    {"format": F("str", "prometheus or openmetrics"),
                     "text": F("str", "the exposition (docs/metrics.md)")}),
    # -- IO records ------------------------------------------------------------
    "trace_record": Kind("One completed IO", ("trace --json", "socket trace", "tree trace.json"), RECORD,
                         "One per line (the socket: each in an event message)."),
    "trace_lost": Kind("Records a reader missed", ("tree trace.json",),
                       {"device": DEVICE, "lost": F("uint", "records overwritten before they were read")}),
    "trace_restarted": Kind("A new daemon's records", ("tree trace.json",),
                            {"device": DEVICE, "restarted": F("bool", "true: the statistics were created "
                                                                      "again; what follows is the new daemon's")}),
    "trace_end": Kind("The end of a trace stream", ("socket trace",),
                      {"lost": F("uint", "records overwritten before they were read"),
                       "sent": F("uint", "records sent")}),
    "record": Kind("What `record` wrote", ("record --json",),
                   {"device": DEVICE, "format": F("str", "blktrace or fio-iolog"),
                    "files": F("[str]", "the files written"), "ios": F("uint", "IOs written", "IOs"),
                    "late": F("uint", "events out of time order"), "lost": F("uint", "records missed"),
                    "skipped": F("{str: uint}", "ops fio cannot replay, left out", "IOs",
                                 when="with --format fio-iolog"),
                    "read_with": F("[str]", "commands that read the files")}),
    # -- crash states ----------------------------------------------------------
    "mark": Kind("A mark in a device's write log", ("mark --json",), {
        "device": DEVICE, "mark": F("str", "its name"),
        "entry": F("uint", "its entry number in the log, from 0 (what `replay --list` shows)"),
        "entries": F("uint", "entries in the log once it was written")}),
    "crashtest": Kind("What `crashtest` found", ("crashtest --json",), {
        "fs": F("str", "ext4, xfs, btrfs or none"), "log": F("str", "the write log (kept when a state failed)"),
        "epochs": F("uint", "epochs after mkfs: writes up to a persistence point, or the unflushed end"),
        "total_states": F("uint", "crash states the bounds allow"),
        "states": F("uint", "crash states checked"), "failed": F("uint", "of them, the failing ones"),
        "truncated": F("bool", "--max-states cut the run short"),
        "seconds": F("num", "the whole run", "s"),
        "first_failure": F("@crash_failure?", "the first failing state; null: none failed")}),
    "crash_failure": Kind("A failing crash state", (), {
        "epoch": F("uint", "its epoch, from 0"),
        "point": F("uint?", "the persistence point's entry; null: the log's unflushed end"),
        "point_flags": F("[str]", "that entry's flags (flush, fua)"),
        "kind": F("str", "base, prefix, drop, random or all: how its subset was chosen"),
        "why": F("str", "what failed (mount, --check or the checker) and its last lines"),
        "writes": F("[@crash_write]", "the epoch's writes"),
        "rebuild": F("str", "the `ublkshell replay` command that rebuilds the state")}),
    "crash_write": Kind("One write of a failing state's epoch", (), {
        "entry": F("uint", "its entry in the log"), "flags": F("[str]", "write, fua, discard, meta"),
        "sector": F("uint", "first sector, in the log's sector size"), "sectors": F("uint", "sectors"),
        "persisted": F("bool", "in this state; false: lost")}),
    "replay_entry": Kind("One entry of a dm-log-writes log", ("replay --list --json",),
                         {"entry": F("uint", "its index, from 0"),
                          "flags": F("[str]", "write, flush, fua, discard, mark, meta"),
                          "sector": F("uint", "first sector, in the log's sector size"),
                          "sectors": F("uint", "sectors written or discarded"),
                          "mark": F("str?", "a mark's name; null: not a mark")}),
    "replay": Kind("What `replay` wrote", ("replay --json",), {
        "log": F("str", "the log"), "target": F("str", "what it was replayed onto"),
        "entries": F("uint", "entries replayed"), "last_entry": F("uint?", "the last one; null: none"),
        "sector_size": F("uint", "the log's sector size", "bytes"),
        "writes": F("uint", "write entries"), "bytes": F("uint", "bytes they wrote", "bytes"),
        "discards": F("uint", "discards (written as zeroes)"), "flushes": F("uint", "flush entries"),
        "marks": F("uint", "marks"), "checks": F("uint", "checks that ran (all passed)")}),
    "replay_failed": Kind("A `replay --check` that failed", ("replay --check CMD --json",), {
        "log": F("str", "the log"), "target": F("str", "it holds the state the check failed on"),
        "failed_entry": F("uint", "the entry after which the check failed"),
        "flags": F("[str]", "that entry's flags"), "check_status": F("int", "the check's exit status"),
        "output": F("str", "the check's last lines"), "rebuild": F("str", "the command that rebuilds the state"),
        "writes": F("uint", "write entries replayed"), "bytes": F("uint", "bytes they wrote", "bytes"),
        "discards": F("uint", "discards"), "flushes": F("uint", "flush entries"), "marks": F("uint", "marks"),
        "checks": F("uint", "checks that ran, the failed one included")}),
    # -- faults ----------------------------------------------------------------
    "faults": Kind("A device's fault rules", ("faults --json", "socket faults", "tree faults.json"),
                   {"device": DEVICE, "seed": F("uint", "the seed of p= and random choices"),
                    "hung": F("uint", "IOs withheld by hang rules now", "IOs"),
                    "heal_log": F("@heal_log", "badblocks' log of rewritten sectors"),
                    "rules": F("[@rule]", "in match order (the first match wins)")}),
    "heal_log": Kind("Badblocks' heal log", (),
                     {"used": F("uint", "runs used"), "size": F("uint", "runs it holds")}),
    "rule": Kind("A fault rule", (), RULE_FIELDS),
    "rule_added": Kind("Rules a fault verb added",
                       ("delay, fail, drop, corrupt, torn, hang, flakey, badblocks --json",),
                       {"device": DEVICE, "added": F("[@rule_ref]", "one rule, or several for one line")}),
    "rule_ref": Kind("A rule added", (), {"id": RULE_FIELDS["id"], "text": RULE_FIELDS["text"]}),
    "clear": Kind("Rules removed", ("clear --json",),
                  {"device": DEVICE, "cleared": F("uint", "how many"),
                   "rule": F("uint?", "the one asked for; null: all")}),
    "seed": Kind("The seed", ("seed --json",), {"device": DEVICE, "seed": F("uint", "now")}),
    "powercut": Kind("A power cut", ("powercut --json",),
                     {"device": DEVICE, "dropped": F("uint", "unflushed writes undone", "IOs"),
                      "kept": F("uint", "unflushed writes kept", "IOs"),
                      "dropped_bytes": F("uint", "data undone", "bytes"),
                      "keep": F("num", "the chance each unflushed write had to be kept"),
                      "seed": F("uint", "the seed the choices came from"),
                      "failed": F("uint", "undos that could not be written", "IOs"),
                      "failed_error": F("str?", "why; null: none failed"),
                      "recovery": F("bool", "the device can be recovered")}),
    # -- the server ------------------------------------------------------------
    "ping": Kind("The server", ("socket ping",),
                 {"version": F("uint", "the protocol's version"), "schema": F("uint", "this schema's version"),
                  "pid": F("int", "the server's pid"), "mount": F("str?", "where the stats tree is")}),
    "event": Kind("A server event", ("socket events",),
                  {"t": F("num", "when", "s since the epoch"), "kind": F("str", "device-added, daemon-died, ..."),
                   "id": HANDLE, "device": DEVICE,
                   "pid": F("int", "the daemon's pid", when="on device and daemon events"),
                   "old_pid": F("int?", "the dead daemon's pid", when="on recoveries"),
                   "recoveries": F("uint?", "daemons that took over", when="on recoveries"),
                   "abandoned": F("uint?", "IOs the dead daemon held", when="on recoveries"),
                   "seconds": F("num?", "how long the recovery took", "s", when="on auto-recovered"),
                   "state": F("str", "the kernel's state (`-` on FUSE)",
                              when="on daemon-died, -killed, -quiesced"),
                   "recovery": F("str?", "the device's recovery mode", when="on daemon-died, -killed, -quiesced"),
                   "inflight": F("uint?", "IOs it was serving", "IOs", when="on daemon-died, -killed, -quiesced"),
                   "error": F("str", "why", when="on auto-recover-failed")}),
}

# the result of each verb's --json (and of the socket command of that name)
VERB_KINDS = {"add": "device_entry", "del": "del", "list": "list", "info": "info", "features": "features",
              "resize": "resize", "quiesce": "quiesce", "resume": "resume", "upgrade": "upgrade",
              "stats": "stats", "lat": "lat", "inflight": "inflight", "metrics": "metrics", "faults": "faults",
              "clear": "clear", "seed": "seed", "powercut": "powercut", "kill": "kill", "recover": "recover",
              "mark": "mark",
              **{a: "rule_added" for a in ("delay", "fail", "drop", "corrupt", "torn", "hang", "flakey",
                                           "badblocks")}}
# the stats tree's .json twins (per device; `queues/N/` per queue) and what each line or file is
TREE_KINDS = {"info.json": "tree_info", "params.json": "device_entry", "stats.json": "stats",
              "latency.json": "latency", "inflight.json": "inflight", "faults.json": "faults",
              "trace.json": "trace_record", "queues/N/stats.json": "queue_stats",
              "queues/N/inflight.json": "queue_inflight"}


class SchemaError(ValueError):
    pass


_SCALARS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "uint": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "num": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
    "obj": lambda v: isinstance(v, dict), "any": lambda v: True,
}
_MAP = re.compile(r"^\{(op|str): (.+)\}$")


def _check_type(t: str, v, path: str) -> None:
    if t.endswith("?"):
        if v is None:
            return
        t = t[:-1]
    if t.startswith("@"):
        return _check_kind(t[1:], v, path)
    if t.startswith("["):
        if not isinstance(v, list):
            raise SchemaError(f"{path}: expected a list, got {type(v).__name__}")
        for i, x in enumerate(v):
            _check_type(t[1:-1], x, f"{path}[{i}]")
        return
    m = _MAP.match(t)
    if m:
        if not isinstance(v, dict):
            raise SchemaError(f"{path}: expected an object, got {type(v).__name__}")
        if m.group(1) == "op" and sorted(v) != sorted(OPS):
            raise SchemaError(f"{path}: keys {sorted(v)}, expected one per op {sorted(OPS)}")
        for k, x in v.items():
            _check_type(m.group(2), x, f"{path}.{k}")
        return
    if t not in _SCALARS:
        raise SchemaError(f"{path}: the schema names an unknown type {t!r}")
    if not _SCALARS[t](v):
        raise SchemaError(f"{path}: expected {t}, got {v!r:.60}")


def _check_kind(kind: str, obj, path: str) -> None:
    k = KINDS.get(kind)
    if k is None:
        raise SchemaError(f"{path}: no kind {kind!r} in the schema")
    if isinstance(k.fields, str):
        return _check_type(k.fields, obj, path)
    if not isinstance(obj, dict):
        raise SchemaError(f"{path}: expected a {kind} object, got {type(obj).__name__}")
    extra = sorted(set(obj) - set(k.fields))
    if extra:
        raise SchemaError(f"{path}: keys not in the schema of {kind}: {', '.join(extra)}")
    for key, f in k.fields.items():
        if key not in obj:
            if f.when is None:
                raise SchemaError(f"{path}: {kind} has no {key!r}")
            continue
        _check_type(f.type, obj[key], f"{path}.{key}")


def check(kind: str, obj):
    """obj if it is what the schema says a `kind` is; SchemaError naming the first difference."""
    _check_kind(kind, obj, kind)
    return obj


# -- docs/schema.md -----------------------------------------------------------------
INTRO = f"""\
# JSON schema

Generated from `ublkshell/observe/schema.py` (`python -m ublkshell.observe.schema > docs/schema.md`);
`tests/test_schema.py` fails when this file and the module differ, and holds every face's real output
to it.

**Version {SCHEMA_VERSION}.** `ublkshell --version` prints it (`ublkshell X (JSON schema {SCHEMA_VERSION})`),
the socket's `ping` returns it as `schema`. The number goes up when a key is removed or renamed or its
type or meaning changes; a new key does not change it, so read the keys you know and ignore the rest.
Results carry no version key of their own: the version is the tool's, not the object's, and a list or
a stream of lines has nowhere to put one.

**One object, every face.** `ublkshell VERB --json`, the socket's result for `VERB`
(docs/protocol.md) and the stats tree's `.json` twin of a file are the same object, made by the same
function: `stats 0 --json`, `{{"cmd": "stats"}}` and `/mnt/ublkstats/ublkb0/stats.json` differ only in when
they were read. A text file of the tree and its twin hold the same numbers (the tree's root `metrics`
is the Prometheus text itself, docs/metrics.md, and has no twin).

**Names, not internal ids.** A device is named as you type it: `"device": "0"` for /dev/ublkb0,
`"device": "fuse0"` for a FUSE-transport device. Only objects that describe a device (`list`, `add`,
`info.json`, `params.json`, events) also carry `"id"`, the server's numeric handle (the ublk id, or
1048576 + N for fuseN), beside its `"name"`.

**Faults by label.** A record's or a tag's `fault` is the rule that acted, as the text faces show it:
`"delay#3"` (action, rule id; `faults ID` lists rule 3), or null.

**Units** are in the key where they matter (`_ns`, `_s`, `bytes`) and in the tables below. Latency is
the daemon's service time, from the moment its queue thread takes a request to the moment it hands
the result back. Types: `int`, `uint` (>= 0), `num` (int or float), `str`, `bool`, `obj` (any object);
`T?` may be null; `[T]` a list; `{{op: T}}` an object with one key per op ({", ".join(OPS)});
`{{str: T}}` any keys; a kind's name links to its table. A key with a condition is present only then.

**A new verb or tree file** gets its kind in `ublkshell/observe/schema.py` (`KINDS`, and
`VERB_KINDS` or `TREE_KINDS`): tests/test_schema.py fails on a verb, or a tree file without a `.json`
twin, that the table does not name.
"""


def _doc_type(t: str) -> str:
    return re.sub(r"@(\w+)", lambda m: f"[{m.group(1)}](#{m.group(1)})", t)


def markdown() -> str:
    out = [INTRO]
    faces = [(n, k) for n, k in KINDS.items() if k.faces]
    out.append("## Faces\n\n| where | kind |\n|---|---|")
    for n, k in faces:
        out.append(f"| {'; '.join(f'`{f}`' for f in k.faces)} | [{n}](#{n}) |")
    out.append("")
    for n, k in KINDS.items():
        seen = f" Seen in: {', '.join(f'`{f}`' for f in k.faces)}." if k.faces else ""
        out.append(f"## {n}\n\n{k.title}." + seen
                   + (f" {k.doc}" if k.doc else "") + "\n")
        if isinstance(k.fields, str):
            out.append(f"Its type: {_doc_type(k.fields)}\n")
            continue
        out.append("| key | type | unit | meaning |\n|---|---|---|---|")
        for key, f in k.fields.items():
            when = f" (present {f.when})" if f.when else ""
            out.append(f"| `{key}` | {_doc_type(f.type).replace('|', '/')} | {f.unit} | {f.meaning}{when} |")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
