"""One JSON schema for every face (ublkshell/observe/schema.py, docs/schema.md).

On a real FUSE-transport device served by a real server with its stats tree mounted
(root, /dev/fuse and the loop driver; no ublk_drv): every JSON face (`--json`, the
socket's results and streams, the tree's .json twins) holds to the description, every
tree file with a twin says the same numbers as its twin, and a FUSE device is `fuse0` in
all of them, never its internal number."""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from ublkshell.bridge.client import Client
from ublkshell.devices import ids as devids
from ublkshell.observe import schema
from ublkshell.observe.names import OPS
from ublkshell.observe.render import pow2_hist
from ublkshell.observe.stats import fmt_ns
from ublkshell.units import human

# the FUSE device helpers are the transport tests' own
from test_fuse_transport import pread_direct, pwrite_direct  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUSE0 = devids.parse("fuse0")
# the number as a word: not inside another (the 2^20 ns bucket bound 0.001048576 s is no leak);
# the IO here never adds up to 1 MiB, so no counter coincides with it
LEAK = re.compile(rf"(?<![\d.]){FUSE0}(?!\d)")
KiB = 1024


# -- the description itself (no device needed) -----------------------------------------
def test_docs_are_what_the_module_generates():
    with open(os.path.join(ROOT, "docs", "schema.md")) as f:
        committed = f.read()
    assert committed == schema.markdown(), \
        "docs/schema.md is stale: python -m ublkshell.observe.schema > docs/schema.md"


def _types(t):
    t = t.rstrip("?")
    if t.startswith("["):
        yield from _types(t[1:-1])
    elif t.startswith("{"):
        yield from _types(t.split(": ", 1)[1][:-1])
    else:
        yield t


def test_every_type_is_known_and_every_face_is_described():
    from ublkshell.bridge.tree.content import DEV_FILES, Q_FILES
    from ublkshell.verbs import VERBS

    for name, k in schema.KINDS.items():
        fields = [k.fields] if isinstance(k.fields, str) else [f.type for f in k.fields.values()]
        for t in fields:
            for leaf in _types(t):
                assert leaf in schema._SCALARS or leaf.startswith("@") and leaf[1:] in schema.KINDS, (name, t)
        if not isinstance(k.fields, str):
            assert all(f.meaning for f in k.fields.values()), name
    # every verb's --json, every twin of the tree
    assert set(VERBS) <= set(schema.VERB_KINDS), set(VERBS) - set(schema.VERB_KINDS)
    twins = {n for n, *_ in DEV_FILES if n.endswith(".json")} | {f"queues/N/{n}" for n, *_ in Q_FILES
                                                                  if n.endswith(".json")}
    assert twins == set(schema.TREE_KINDS)
    texts = {n for n, *_ in DEV_FILES if not n.endswith(".json")}
    assert {t for t in texts if f"{t}.json" not in twins} == set(), "a tree file without a .json twin"


def test_check_names_the_first_difference():
    tag = {"queue": 0, "tag": 1, "op": "read", "flags": [], "sector": 0, "sectors": 8, "age_ns": 5,
           "fault": "hang#2"}
    assert schema.check("inflight", {"device": "fuse0", "tags": [tag], "waiting": None})
    for bad, why in ((dict(tag, fault=6 | 2 << 8), "expected str"), (dict(tag, age_ns=-1), "expected uint"),
                     (dict(tag, extra=1), "not in the schema"), ({k: v for k, v in tag.items() if k != "op"},
                                                                 "has no 'op'")):
        with pytest.raises(schema.SchemaError, match=why):
            schema.check("inflight", {"device": "fuse0", "tags": [bad], "waiting": None})
    with pytest.raises(schema.SchemaError, match=r"inflight\.device: expected str"):
        schema.check("inflight", {"device": FUSE0, "tags": [], "waiting": None})
    with pytest.raises(schema.SchemaError, match="one per op"):
        schema.check("latency", {"device": "0", "ops": {}})
    assert schema.check("trace_lost", {"device": "0", "lost": 3})


# -- a real device -------------------------------------------------------------------------
needs_fuse = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control")
    or not shutil.which("losetup"),
    reason="a FUSE-transport device needs root, /dev/fuse, the loop driver and losetup")


class World:
    """A server with its tree, a FUSE device on a loop device, and what every face printed."""

    def __init__(self, root):
        self.root = str(root)
        self.mem = os.path.join(self.root, "mem")
        os.makedirs(self.mem, mode=0o700)
        self.env = dict(os.environ, UBLKSHELL_STATE_DIR=os.path.join(self.root, "state"),
                        UBLKSHELL_DATA_DIR=self.mem, NO_COLOR="1")
        self.sock, self.tree = os.path.join(self.root, "s.sock"), os.path.join(self.root, "tree")
        os.mkdir(self.tree)
        self.seen = []  # (face, obj) of every JSON output, for the names check
        self.texts = []  # every text output, for the same
        self.server = None
        self.dev = None

    def run(self, *args, check=True, timeout=60):
        p = subprocess.run([sys.executable, "-m", "ublkshell", *args], capture_output=True, text=True,
                           timeout=timeout, env=self.env)
        if check:
            assert p.returncode == 0, (args, p.stdout, p.stderr)
        self.texts.append(p.stdout + p.stderr)
        return p

    def json(self, kind, *args):
        """A verb's --json output, checked against the schema."""
        obj = json.loads(self.run(*args, "--json").stdout)
        self.seen.append((" ".join(args), obj))
        return schema.check(kind, obj)

    def lines(self, kind, *args):
        objs = [json.loads(x) for x in self.run(*args).stdout.splitlines()]
        for o in objs:
            self.seen.append((" ".join(args), o))
            schema.check(kind, o)
        return objs

    def file(self, rel) -> str:
        with open(os.path.join(self.tree, "fuse0", rel)) as f:
            text = f.read()
        self.texts.append(text)
        return text

    def twin(self, rel):
        kind = schema.TREE_KINDS[re.sub(r"^queues/\d+/", "queues/N/", rel)]
        obj = json.loads(self.file(rel))
        self.seen.append((f"tree {rel}", obj))
        return schema.check(kind, obj)

    def call(self, kind, cmd, **args):
        with Client(self.sock, timeout=60) as c:
            obj = c.call(cmd, **args)
        self.seen.append((f"socket {cmd}", obj))
        return schema.check(kind, obj) if kind else obj

    def start(self):
        self.server = subprocess.Popen([sys.executable, "-m", "ublkshell", "serve", "--socket", self.sock,
                                        "--mount", self.tree], stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, env=self.env, text=True)
        deadline = time.monotonic() + 30
        while not (os.path.exists(self.sock) and os.path.ismount(self.tree)):
            assert self.server.poll() is None, self.server.stdout.read()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    def stop(self) -> str:
        self.server.send_signal(signal.SIGTERM)
        out, _ = self.server.communicate(timeout=30)
        return out

    def quiet(self):
        """Wait until nothing changes the counters (a udev probe of the new loop device, say)."""
        last, stable_since = None, time.monotonic()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open(os.path.join(self.tree, "fuse0", "stats.json")) as f:
                now = json.load(f)
            if now != last:
                last, stable_since = now, time.monotonic()
            elif time.monotonic() - stable_since > 0.5:
                return
            time.sleep(0.1)
        raise AssertionError("the device never went idle")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("schema"))
    w.start()
    try:
        w.dev = w.json("device_entry", "add", "--transport", "fuse", "-t", "mem", "--size", "16M", "--loop",
                       "--powercut")
        assert w.dev["name"] == "fuse0" and w.dev["transport"] == "fuse"
        loop = w.dev["loop"]
        for i in range(8):
            pwrite_direct(loop, i * 64 * KiB, os.urandom(64 * KiB))
        w.run("delay", "fuse0", "200us", "op=read", "lba", "0..127")
        for i in range(16):
            pread_direct(loop, i * 4 * KiB, 4 * KiB)
        w.quiet()
        yield w
    finally:
        w.run("del", "-a", check=False)
        w.log = w.stop()
        subprocess.run(["umount", "-l", w.tree], capture_output=True)
        assert not os.path.ismount(w.tree)


class Hung:
    """A read a hang rule holds (so that inflight has something to show), let go on exit."""

    def __init__(self, w: World):
        self.w = w

    def __enter__(self):
        self.rule = self.w.json("rule_added", "hang", "fuse0", "lba", "2048..2055", "op=read")["added"][0]["id"]
        self.th = threading.Thread(target=pread_direct, args=(self.w.dev["loop"], 2048 * 512, 4 * KiB))
        self.th.start()
        deadline = time.monotonic() + 10
        while not self.w.twin("inflight.json")["tags"]:
            assert time.monotonic() < deadline, "the hung read never showed"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.w.run("clear", "fuse0", str(self.rule))
        self.th.join(10)
        assert not self.th.is_alive()


# -- every JSON face holds to the schema ----------------------------------------------------
@needs_fuse
def test_every_verb_json_face(world, tmp_path):
    w = world
    (entry,) = w.json("list", "list")
    assert (entry["id"], entry["name"], entry["loop"]) == (FUSE0, "fuse0", w.dev["loop"])
    st = w.json("stats", "stats", "fuse0")
    assert st["device"] == "fuse0" and all(q["device"] == "fuse0" for q in st["queues"])
    assert st["ops"]["write"]["ios"] >= 8 and st["ops"]["read"]["ios"] >= 16
    hist = w.json("stats", "stats", "fuse0", "--histograms")["ops"]["write"]
    assert sum(b["count"] for b in hist["buckets"]) == hist["ios"] and hist["lat_sum_ns"] > 0
    for op in OPS:
        lat = w.json("lat", "lat", "fuse0", op)
        assert lat["device"] == "fuse0" and sum(b["count"] for b in lat["buckets"]) == lat["ios"]
    assert w.json("inflight", "inflight", "fuse0")["tags"] == []
    w.json("metrics", "metrics")
    added = w.json("rule_added", "fail", "fuse0", "lba", "9000", "op=write")
    assert added["device"] == "fuse0"
    faults = w.json("faults", "faults", "fuse0")
    assert faults["device"] == "fuse0" and [r["action"] for r in faults["rules"]] == ["delay", "fail"]
    assert faults["rules"][1]["lba"] == [9000, 9000]
    assert w.json("clear", "clear", "fuse0", str(added["added"][0]["id"])) == {
        "device": "fuse0", "cleared": 1, "rule": added["added"][0]["id"]}
    assert w.json("seed", "seed", "fuse0")["device"] == "fuse0"
    recs = w.lines("trace_record", "trace", "fuse0", "--from-start", "--count", "30", "--duration", "5s",
                   "--json")
    assert recs and {r["device"] for r in recs} == {"fuse0"}
    assert any(r["fault"] == f"delay#{faults['rules'][0]['id']}" for r in recs)
    assert all(r["fault"] is None for r in recs if r["op"] == "write")
    rec = w.json("record", "record", "fuse0", "--from-start", "-o", str(tmp_path / "run"), "--count", "5",
                 "--duration", "5s")
    assert rec["device"] == "fuse0" and rec["ios"] == 5
    rec = w.json("record", "record", "fuse0", "--from-start", "--format", "fio-iolog",
                 "-o", str(tmp_path / "io.log"), "--duration", "1s")
    assert "skipped" in rec
    info = w.json("info", "info", "fuse0")
    assert info["device"] == "fuse0" and info["list"]["name"] == "fuse0"
    if os.path.exists("/dev/ublk-control"):
        w.json("features", "features")


@needs_fuse
def test_stats_interval_rows(world):
    (row,) = world.lines("stats_row", "stats", "fuse0", "--interval", "1", "--count", "1", "--json")
    assert row["device"] == "fuse0" and row["block"] == os.path.basename(world.dev["loop"])


@needs_fuse
def test_socket_faces(world):
    w = world
    ping = w.call("ping", "ping")
    assert ping["schema"] == schema.SCHEMA_VERSION
    for cmd, kind, args in (("list", "list", {}), ("stats", "stats", {"id": "fuse0"}),
                            ("lat", "lat", {"id": "fuse0", "op": "write"}), ("inflight", "inflight", {"id": "fuse0"}),
                            ("faults", "faults", {"id": "fuse0"}), ("metrics", "metrics", {}),
                            ("stats", "stats", {"id": FUSE0})):
        w.call(kind, cmd, **args)
    # the socket's stats and the tree's are one object
    assert w.call("stats", "stats", id="fuse0") == w.twin("stats.json")
    # the shell's --json is the socket's result, printed
    for line, kind in (("lat fuse0 write --json", "lat"), ("faults fuse0 --json", "faults"),
                       ("inflight fuse0 --json", "inflight")):
        obj = json.loads(w.run("--socket", w.sock, "-c", line).stdout)
        w.seen.append((f"shell {line}", obj))
        assert schema.check(kind, obj) == w.json(kind, *line.split()[:-1])
    events = w.call(None, "events")
    for ev in events:
        schema.check("event", ev)
    assert any(ev["kind"] == "device-added" and ev["device"] == "fuse0" and ev["id"] == FUSE0 for ev in events)
    # a trace stream: its events are records, its end is trace_end
    with Client(w.sock, timeout=60) as c:
        rid = c.send("trace", {"id": "fuse0", "from_start": True, "count": 5})
        got, end = [], None
        while end is None:
            msg = c._readline()
            if msg.get("id") != rid or msg.get("started"):
                continue
            if "event" in msg:
                got.append(schema.check("trace_record", msg["event"]))
            else:
                end = schema.check("trace_end", msg["result"])
    assert len(got) == 5 == end["sent"] and {r["device"] for r in got} == {"fuse0"}
    w.seen += [("socket trace", r) for r in got]


@needs_fuse
def test_every_tree_twin(world):
    w = world
    for rel, kind in schema.TREE_KINDS.items():
        if kind != "trace_record":
            obj = w.twin(rel.replace("/N/", "/0/"))
            assert obj.get("device", obj.get("name")) == "fuse0", rel
    info = w.twin("info.json")
    assert (info["transport"], info["loop"], info["file"]) == ("fuse", w.dev["loop"], w.dev["file"])
    # one object, whichever face: lat --json is latency.json's op, faults --json is faults.json
    lat = w.twin("latency.json")
    for op in ("read", "write"):
        assert w.json("lat", "lat", "fuse0", op) == {"device": "fuse0", "op": op, **lat["ops"][op]}
    assert w.json("faults", "faults", "fuse0") == w.twin("faults.json")
    assert w.json("stats", "stats", "fuse0")["queues"][0] == w.twin("queues/0/stats.json")
    with Hung(w) as h:
        tags = w.twin("inflight.json")["tags"]
        assert [t["fault"] for t in tags] == [f"hang#{h.rule}"]
        assert w.json("inflight", "inflight", "fuse0")["tags"][0]["fault"] == tags[0]["fault"]
        assert w.twin("queues/0/inflight.json")["queue"] == 0
    w.quiet()


def _trace_pair(w: World, n: int):
    """Read n records from the tree's trace and trace.json, opened before the IO they show."""
    got = {}

    def reader(rel):
        with open(os.path.join(w.tree, "fuse0", rel)) as f:
            got[rel] = [f.readline() for _ in range(n)]

    ths = [threading.Thread(target=reader, args=(rel,)) for rel in ("trace", "trace.json")]
    for t in ths:
        t.start()
    time.sleep(0.5)  # both open and reading before the IO
    for i in range(n):
        pread_direct(w.dev["loop"], i * 4 * KiB, 4 * KiB)
    for t in ths:
        t.join(10)
        assert not t.is_alive(), "a trace file gave fewer lines than IOs"
    return got["trace"], got["trace.json"]


# -- the text and JSON of each tree file agree -----------------------------------------------
def _cmp_info(text, j):
    rows = dict(line.split(None, 1) if " " in line else (line, "") for line in
                (re.sub(r"^(block size|io mode)", lambda m: m.group(1).replace(" ", "_"), x) for x in
                 text.splitlines()))
    assert rows["device"].strip() == devids.stem(j["id"]) and j["name"] == devids.name(j["id"])
    assert rows["target"].strip() == j["describe"]
    assert rows["size"].strip() == f"{human(j['size'])} ({j['size']} bytes)"
    assert rows["block_size"].strip() == str(j["block_size"])
    assert rows["queues"].strip() == f"{j['queues']} x {j['depth']}"
    assert rows["daemon"].strip() == f"pid {j['pid']} ({'alive' if j['daemon_alive'] else 'dead'})"
    assert rows["flags"].split()[0] == f"{j['flags']:#x}"
    assert rows["recovery"].strip() == (j["recovery"] or "none")
    assert rows["transport"].strip() == f"fuse: file {j['file']}, block device {j['loop'] or '-'}"


def _flatten(prefix, v, out):
    if isinstance(v, dict):
        for k in v:
            _flatten(f"{prefix}.{k}" if prefix else k, v[k], out)
    else:
        out[prefix] = v if isinstance(v, str) else json.dumps(v)


def _cmp_params(text, j):
    flat = {}
    _flatten("", j, flat)
    rows = {line.split(None, 1)[0]: (line.split(None, 1) + [""])[1].strip() for line in text.splitlines()}
    assert rows == {k: v.strip() for k, v in flat.items()}


def _cmp_stats_table(text, j):
    lines = text.splitlines()
    assert lines[0].endswith(f": {j['inflight']} in flight")
    rows = {x.split()[0]: x.split()[1:] for x in lines[2:] if x.split() and x.split()[0] in OPS}
    assert set(rows) == set(OPS)
    for op, o in j["ops"].items():
        assert rows[op] == [str(o["ios"]), human(o["bytes"]), str(o["errors"]),
                            *(fmt_ns(o[k]) for k in ("avg_ns", "p50_ns", "p99_ns", "max_ns"))], op
    ring = next(x for x in lines if x.startswith("ring:"))
    r = j["ring"]
    assert f"ring: {r['enters']} io_uring_enter, {r['enters_per_io']:.3f} per IO" in ring
    assert f"{r['commits']} commits, {r['ios_per_commit']:.1f} IOs per commit" in ring


def _cmp_latency(text, j):
    shown = [op for op in OPS if j["ops"][op]["ios"]]
    heads = [x for x in text.splitlines() if not x.startswith(" ")]
    assert [h.split(":")[0] for h in heads] == shown
    blocks = re.split(r"\n(?=\S)", text.strip())
    for op, block in zip(shown, blocks):
        o = j["ops"][op]
        head, *bars = block.splitlines()
        assert head == (f"{op}: {o['ios']} IOs, avg {fmt_ns(o['avg_ns'])}, p50 {fmt_ns(o['p50_ns'])}, "
                        f"p90 {fmt_ns(o['p90_ns'])}, p99 {fmt_ns(o['p99_ns'])}, p99.9 {fmt_ns(o['p999_ns'])}, "
                        f"max {fmt_ns(o['max_ns'])}")
        want = pow2_hist((b["low_ns"], b["count"]) for b in o["buckets"])
        assert [(b.split()[0], int(b.split()[3])) for b in bars] == [(fmt_ns(x["low_ns"]), x["count"]) for x in want]


def _cmp_tags(text, j):
    rows = [x.split() for x in text.splitlines()[1:]]
    assert j["tags"], "compare with something in flight"
    # AGE is left out: it grows between the two reads
    assert [[r[0], r[1], r[2], r[3], r[5]] for r in rows] == [
        [str(t["queue"]), str(t["tag"]), t["op"], f"{t['sector']}+{t['sectors']}", t["fault"] or "-"]
        for t in j["tags"]]


def _cmp_faults(text, j):
    lines = [x for x in text.splitlines() if not x.startswith("#")]
    assert lines[0] == f"seed {j['seed']}" + (f"; {j['hung']} IO withheld by hang" if j["hung"] else "")
    rows = [x.split(None, 2) for x in lines[2:]]
    assert [(int(r[0]), int(r[1]), r[2].split("  (")[0]) for r in rows] == [
        (r["id"], r["hits"], r["text"]) for r in j["rules"]]


AGREE = {"info": _cmp_info, "params": _cmp_params, "stats": _cmp_stats_table, "latency": _cmp_latency,
         "inflight": _cmp_tags, "faults": _cmp_faults, "queues/0/stats": _cmp_stats_table,
         "queues/0/inflight": _cmp_tags}


@needs_fuse
def test_text_and_json_of_every_tree_file_agree(world):
    w = world
    d = os.path.join(w.tree, "fuse0")
    twins = sorted(n[:-5] for n in os.listdir(d) if n.endswith(".json")) + sorted(
        f"queues/0/{n[:-5]}" for n in os.listdir(os.path.join(d, "queues", "0")) if n.endswith(".json"))
    assert set(twins) == set(AGREE) | {"trace"}, "a twin nobody compares"
    w.quiet()
    # a hang rule's timer wakes the queue's ring (its counters move): the rest is compared idle
    held = ("inflight", "queues/0/inflight", "faults")
    for rel, cmp in AGREE.items():
        if rel not in held:
            cmp(w.file(rel), json.loads(w.file(f"{rel}.json")))
    with Hung(w):
        for rel in held:
            AGREE[rel](w.file(rel), json.loads(w.file(f"{rel}.json")))
    text, lines = _trace_pair(w, 6)
    for t, j in zip(text, lines):
        r = schema.check("trace_record", json.loads(j))
        w.seen.append(("tree trace.json", r))
        f = t.split()
        res = str(r["result"]) if r["result"] >= 0 else f"-{errno.errorcode[-r['result']]}"
        assert f == [f"{r['t_ns'] / 1e9:.6f}", f"q{r['queue']}", f"t{r['tag']}", r["op"],
                     ",".join(r["flags"]) or "-", f"{r['sector']}+{r['sectors']}", fmt_ns(r["lat_ns"]), res,
                     *([r["fault"]] if r["fault"] else [])]
    assert any(json.loads(j)["fault"] for j in lines), "the delay rule names itself in both"


# -- names, not numbers ---------------------------------------------------------------------
def _leaks(obj, path="$"):
    """Where obj holds the FUSE device's internal number, other than as a handle named `id`."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            # a quantity may happen to be 2^20 (a latency bucket's bound in ns): not a name
            if v == FUSE0 and not isinstance(v, bool) and k != "id" and not k.endswith(("_ns", "bytes", "size")):
                yield f"{path}.{k}"
            yield from _leaks(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            if v == FUSE0 and not isinstance(v, bool):
                yield f"{path}[{i}]"
            yield from _leaks(v, f"{path}[{i}]")
    elif isinstance(obj, str) and LEAK.search(obj):
        yield path


@needs_fuse
def test_fuse_devices_are_named_in_every_face(world):
    w = world
    for face, obj in w.seen:
        assert not list(_leaks(obj)), (face, list(_leaks(obj)))
    # the text faces too: rule verbs, errors, the tree
    w.run("fail", "fuse0", "op=write", "count=1")
    w.run("clear", "fuse0")
    p = w.run("clear", "fuse0", "999", check=False)
    assert p.returncode == 1 and "fuse0" in p.stderr
    for text in w.texts:
        # the handle may show as what it is, the `id` of a device's description (list, add, params)
        text = re.sub(rf'"id": {FUSE0}\b|^id +{FUSE0}$', "", text, flags=re.M)
        assert not LEAK.search(text), text
    # and what `del` says it deleted: a name
    w.run("add", "--transport", "fuse", "-t", "null", "--size", "1M")
    assert w.json("del", "del", "fuse1") == {"deleted": ["fuse1"], "all": False}


@needs_fuse
def test_powercut_names_the_device(world):
    w = world
    dev = w.json("device_entry", "add", "--transport", "fuse", "-t", "mem", "--size", "4M", "--powercut")
    pwrite_direct(dev["file"], 0, os.urandom(4 * KiB))
    r = w.json("powercut", "powercut", dev["name"])
    assert r["device"] == dev["name"] and r["dropped"] == 1
    assert not list(_leaks(r))
    assert str(dev["id"]) not in w.run("del", dev["name"]).stdout


@needs_fuse
def test_server_log_names_devices(world):
    # last: stopping the world's server gives its log
    w = world
    with Client(w.sock, timeout=30) as c:
        c.call("fail", id="fuse0", words=["op=write", "lba", "1"])
        c.call("clear", id="fuse0")
    fd = os.open(os.path.join(w.tree, "fuse0", "faults"), os.O_WRONLY)
    try:
        with pytest.raises(OSError):
            os.write(fd, b"nonsense\n")
    finally:
        os.close(fd)
    log = w.stop()
    w.start()
    assert "fuse0" in log and not LEAK.search(log), log
