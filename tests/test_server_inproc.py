"""The server in-process, with pytest-trio: the protocol over memory streams (bridge/rpc.py),
the trace stream on a real statistics file served by a fake device source, and the daemon
watch (bridge/supervisor.py) over a fake registry under trio's MockClock.

No socket, no subprocess, no sleeps in real time: where time matters the autojump clock
jumps it, so a stream that fails to end fails the test at once instead of hanging it. The
subprocess tests (tests/test_server.py) stay: they prove the same server on a real socket."""
import json
import threading
import time

import pytest
import trio
import trio.testing

from ublkshell import procs
from ublkshell._native import lib
from ublkshell.bridge import supervisor as sup_mod
from ublkshell.bridge.events import Events
from ublkshell.bridge.protocol import MAX_LINE
from ublkshell.bridge.rpc import MAX_PENDING, Rpc
from ublkshell.bridge.supervisor import WATCH_S, Supervisor, keep
from ublkshell.devices import recovery as recovery_mod
from ublkshell.devices import registry
from ublkshell.errors import UblkError
from ublkshell.observe import shm as shm_mod
from ublkshell.observe import schema

READ, WRITE = lib.UBLK_IO_OP_READ, lib.UBLK_IO_OP_WRITE
DEV = 5  # the one device the fake source knows
WAIT_S = 5  # real seconds a test on the real clock may wait for an answer that should be instant


# -- the fakes ----------------------------------------------------------------
class FakeVerbs:
    """Stands in for verbs.call (run in a worker thread by Rpc). args["do"] picks what the
    verb does: block until released, raise, return what JSON cannot hold; else it echoes."""

    def __init__(self):
        self.release = threading.Event()
        self.calls = []
        self.running = 0
        self.lock = threading.Lock()

    def __call__(self, name: str, args: dict):
        self.calls.append((name, args))
        do = args.get("do")
        if do == "block":
            with self.lock:
                self.running += 1
            try:
                if not self.release.wait(WAIT_S * 2):
                    raise TimeoutError("never released")
            finally:
                with self.lock:
                    self.running -= 1
            return {"released": args.get("n")}
        if do == "raise":
            return 1 // 0
        if do == "ublk":
            raise UblkError("device 3 is\nbusy")
        if do == "unencodable":
            return {"rules": {1, 2}}  # a set: json cannot encode it
        if do == "nan":
            return {"p": float("nan")}  # json.dumps would write NaN, which is not JSON
        return {"verb": name, "args": args}


class FakeSource:
    """A DeviceSource over statistics files the test made."""

    def __init__(self, shms=None):
        self.shms = shms or {}

    def devices(self) -> dict:
        return {d: {"pid": 1} for d in self.shms}

    def shm(self, dev_id: int):
        return self.shms.get(dev_id)


class Client:
    """The client's end of a memory stream: JSON lines out, JSON lines in."""

    def __init__(self, stream):
        self.stream = stream
        self.buf = b""

    async def send(self, **msg) -> None:
        await self.stream.send_all(json.dumps(msg).encode() + b"\n")

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def recv(self):
        """The next line as JSON, or None once the server closed its side."""
        while b"\n" not in self.buf:
            data = await self.stream.receive_some(65536)
            if not data:
                assert self.buf == b"", f"a partial line before EOF: {self.buf[:200]!r}"
                return None
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    async def recv_n(self, n: int) -> list:
        return [await self.recv() for _ in range(n)]

    async def until_eof(self) -> list:
        out = []
        while (msg := await self.recv()) is not None:
            out.append(msg)
        return out


class Recording(trio.abc.HalfCloseableStream):
    """A server-side stream that remembers every line it sent, and when."""

    def __init__(self, inner):
        self.inner = inner
        self.sent = []

    async def send_all(self, data) -> None:
        await self.inner.send_all(data)
        self.sent.append(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes=None):
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


def make_rpc(verbs=None, source=None, on_shutdown=None) -> Rpc:
    return Rpc(Events(), source or FakeSource(), "/mnt/test", on_shutdown or (lambda delete: None),
               run_verb=verbs or FakeVerbs())


async def serve(rpc, nursery, wrap=None) -> Client:
    """One connection: the server's end served by rpc in nursery, the client's end returned."""
    client, server = trio.testing.memory_stream_pair()
    nursery.start_soon(rpc.serve_conn, wrap(server) if wrap else server)
    return Client(client)


async def running(verbs: FakeVerbs, n: int) -> None:
    """Until n blocking verbs run in their worker threads (which start when they start)."""
    while verbs.running < n:
        await trio.sleep(0.001)


@pytest.fixture
def verbs():
    v = FakeVerbs()
    yield v
    v.release.set()  # a failed test must not leave worker threads waiting


# -- the protocol ---------------------------------------------------------------
async def test_ping(verbs):
    async with trio.open_nursery() as n:
        c = await serve(make_rpc(verbs), n)
        await c.send(id=1, cmd="ping")
        with trio.fail_after(WAIT_S):
            reply = await c.recv()
        assert reply["id"] == 1 and reply["ok"] is True
        assert reply["result"]["version"] == 1 and reply["result"]["mount"] == "/mnt/test"
        await c.stream.aclose()
    assert verbs.calls == []  # ping is the server's own


async def test_pipelined_requests_are_answered_by_id(verbs):
    async with trio.open_nursery() as n:
        c = await serve(make_rpc(verbs), n)
        # one write holding ten requests, ids of both kinds
        ids = [1, "two", 3, "four", 5, 6, 7, "eight", 9, 10]
        await c.send_raw(b"".join(json.dumps({"id": i, "cmd": "stats", "args": {"id": k}}).encode() + b"\n"
                                  for k, i in enumerate(ids)))
        with trio.fail_after(WAIT_S):
            replies = await c.recv_n(len(ids))
        await c.stream.aclose()
    assert sorted(map(str, (r["id"] for r in replies))) == sorted(map(str, ids))
    for r in replies:
        assert r["ok"] and r["result"] == {"verb": "stats", "args": {"id": ids.index(r["id"])}}


async def test_a_slow_verb_does_not_hold_up_a_fast_one(verbs):
    async with trio.open_nursery() as n:
        c = await serve(make_rpc(verbs), n)
        await c.send(id="slow", cmd="list", args={"do": "block", "n": 1})
        await c.send(id="fast", cmd="list", args={})
        await c.send(id="ping", cmd="ping")
        with trio.fail_after(WAIT_S):
            await running(verbs, 1)
            first = await c.recv_n(2)
            assert {r["id"] for r in first} == {"fast", "ping"}
            assert verbs.running == 1  # the slow one is still running
            verbs.release.set()
            assert await c.recv() == {"id": "slow", "ok": True, "result": {"released": 1}}
        await c.stream.aclose()


async def test_requests_beyond_max_pending_are_refused_with_their_id(verbs):
    async with trio.open_nursery() as n:
        c = await serve(make_rpc(verbs), n)
        await c.send_raw(b"".join(json.dumps({"id": i, "cmd": "list", "args": {"do": "block", "n": i}}).encode()
                                  + b"\n" for i in range(MAX_PENDING)))
        await c.send(id="extra", cmd="ping")
        with trio.fail_after(WAIT_S):
            refused = await c.recv()
            assert refused["id"] == "extra" and refused["ok"] is False
            assert f"too many requests in flight on this connection ({MAX_PENDING})" in refused["error"]
            verbs.release.set()
            done = await c.recv_n(MAX_PENDING)
            assert sorted(r["result"]["released"] for r in done) == list(range(MAX_PENDING))
            # the slots came back: the connection takes requests again
            await c.send(id="again", cmd="ping")
            assert (await c.recv())["id"] == "again"
        await c.stream.aclose()


async def test_a_line_over_max_line_is_refused_and_the_connection_closed(verbs):
    async with trio.open_nursery() as n:
        c = await serve(make_rpc(verbs), n)
        # a whole request first: answered, then the endless line
        await c.send(id=1, cmd="ping")
        with trio.fail_after(WAIT_S):
            assert (await c.recv())["id"] == 1
            await c.send_raw(b'{"id": 2, "cmd": "ping", "pad": "' + b"x" * MAX_LINE)
            got = await c.until_eof()
    assert got == [{"id": None, "ok": False, "error": f"request longer than {MAX_LINE} bytes"}]
    assert verbs.calls == []


@pytest.mark.parametrize("line, error", [
    (b"garbage", "not JSON"),
    (b"\xff\xfe{}", "not JSON"),
    (b"[" * 40 + b"]" * 40, "nests deeper than 32 levels"),
    (b'{"id": 1, "cmd": "ping", "x": NaN}', "not JSON: NaN is not a JSON number"),
    (b"[1, 2]", "a request is a JSON object"),
    (b'{"id": true, "cmd": "ping"}', '"id" must be a number or a string'),
    (b'{"id": 1}', 'request has no "cmd" string'),
    (b'{"id": 1, "cmd": "list", "args": []}', '"args" must be an object'),
])
async def test_a_bad_line_gets_one_error_line_and_the_connection_works(verbs, line, error):
    async with trio.open_nursery() as n:
        c = await serve(make_rpc(verbs), n)
        # three bad lines, each answered once, in order; then the connection still works
        await c.send_raw((line + b"\n") * 3)
        await c.send(id="after", cmd="list")
        with trio.fail_after(WAIT_S):
            errors = await c.recv_n(3)
            after = await c.recv()
        await c.stream.aclose()
    for e in errors:
        assert e["id"] is None and e["ok"] is False and error in e["error"] and "\n" not in e["error"]
    assert after == {"id": "after", "ok": True, "result": {"verb": "list", "args": {}}}
    assert verbs.calls == [("list", {})]


async def test_a_verb_that_raises_gives_internal_error_and_the_next_request_works(verbs, capsys):
    async with trio.open_nursery() as n:
        c = await serve(make_rpc(verbs), n)
        with trio.fail_after(WAIT_S):
            await c.send(id=1, cmd="stats", args={"do": "raise"})
            assert await c.recv() == {"id": 1, "ok": False,
                                      "error": "internal error: ZeroDivisionError: integer division or modulo by zero"}
            # a UblkError is the verb's own answer: one line, no "internal"
            await c.send(id=2, cmd="stats", args={"do": "ublk"})
            assert await c.recv() == {"id": 2, "ok": False, "error": "device 3 is busy"}
            await c.send(id=3, cmd="stats", args={"id": 0})
            assert await c.recv() == {"id": 3, "ok": True, "result": {"verb": "stats", "args": {"id": 0}}}
        await c.stream.aclose()
    err = capsys.readouterr().err
    assert "internal error on stats: ZeroDivisionError" in err and "Traceback" in err


@pytest.mark.parametrize("do, error", [("unencodable", "internal error: TypeError: "),
                                       ("nan", "internal error: ValueError: ")])
async def test_a_reply_that_cannot_be_encoded_is_still_one_error_reply(verbs, do, error):
    async with trio.open_nursery() as n:
        c = await serve(make_rpc(verbs), n)
        with trio.fail_after(WAIT_S):
            await c.send(id="bad", cmd="faults", args={"do": do})
            reply = await c.recv()
            await c.send(id="next", cmd="ping")
            assert (await c.recv())["id"] == "next"
        await c.stream.aclose()
    assert reply["id"] == "bad" and reply["ok"] is False
    assert reply["error"].startswith(error), reply


async def test_an_unknown_command_is_an_error(verbs):
    async with trio.open_nursery() as n:
        c = await serve(make_rpc(verbs), n)
        with trio.fail_after(WAIT_S):
            await c.send(id=1, cmd="frob")
            assert await c.recv() == {"id": 1, "ok": False, "error": "unknown command 'frob'"}
        await c.stream.aclose()
    assert verbs.calls == []


async def test_replies_still_arrive_after_the_client_half_closes(verbs):
    async with trio.open_nursery() as n:
        c = await serve(make_rpc(verbs), n)
        await c.send(id=1, cmd="list", args={"do": "block", "n": 1})
        await c.send(id=2, cmd="list", args={"do": "block", "n": 2})
        await c.send(id=3, cmd="ping")
        with trio.fail_after(WAIT_S):
            await running(verbs, 2)
        await c.stream.send_eof()
        # the server has read the EOF (every task is waiting) while both verbs still run
        await trio.testing.wait_all_tasks_blocked()
        assert verbs.running == 2
        verbs.release.set()
        with trio.fail_after(WAIT_S):
            got = await c.until_eof()
    assert sorted(r["id"] for r in got) == [1, 2, 3] and all(r["ok"] for r in got)


@pytest.mark.parametrize("args, delete", [({}, False), ({"delete": True}, True), ({"delete": False}, False)])
async def test_shutdown_replies_before_on_shutdown_is_called(verbs, args, delete):
    calls = []
    rec = None

    def on_shutdown(d):
        # what the client had been sent at the moment the server was told to stop
        calls.append((d, [json.loads(b) for b in rec.sent]))

    def wrap(stream):
        nonlocal rec
        rec = Recording(stream)
        return rec

    async with trio.open_nursery() as n:
        c = await serve(make_rpc(verbs, on_shutdown=on_shutdown), n, wrap=wrap)
        with trio.fail_after(WAIT_S):
            await c.send(id="bye", cmd="shutdown", args=args)
            assert await c.recv() == {"id": "bye", "ok": True, "result": {}}
            # a bad argument is an error and stops nothing
            await c.send(id="bad", cmd="shutdown", args={"delete": "maybe"})
            assert (await c.recv())["ok"] is False
        await c.stream.aclose()
    assert calls == [(delete, [{"id": "bye", "ok": True, "result": {}}])]


# -- the trace stream -------------------------------------------------------------
@pytest.fixture
def shm(tmp_path, monkeypatch):
    monkeypatch.setenv("UBLKSHELL_DATA_DIR", str(tmp_path))
    s = shm_mod.create(DEV, nr_queues=2, depth=32, records=16, pid=1234)
    yield s
    s.close()


def record(s, q: int, op: int, sector: int, lat_ns: int = 10_000, result: int = 4096) -> None:
    assert lib.us_shm_record_io(s.base, q, sector % 32, op, sector, 8, result, lat_ns) == 0


async def trace(c: Client, rid, **args) -> None:
    await c.send(id=rid, cmd="trace", args={"id": DEV, **args})
    assert await c.recv() == {"id": rid, "started": True}


async def test_trace_starts_then_sends_matching_records_and_ends_at_count(shm, autojump_clock):
    async with trio.open_nursery() as n:
        c = await serve(make_rpc(source=FakeSource({DEV: shm})), n)
        record(shm, 0, WRITE, 999, lat_ns=5_000_000)  # before the trace: not sent
        with trio.fail_after(60):
            await trace(c, "t", filters=["op=write", "min_lat=1ms"], count=3)
            record(shm, 0, READ, 1, lat_ns=5_000_000)  # a read
            record(shm, 1, WRITE, 2, lat_ns=10_000)  # too fast
            record(shm, 1, WRITE, 3, lat_ns=2_000_000)
            record(shm, 0, WRITE, 4, lat_ns=3_000_000, result=-5)
            await trio.sleep(1)
            record(shm, 0, WRITE, 5, lat_ns=1_500_000)
            record(shm, 1, WRITE, 6, lat_ns=1_500_000)  # after count: never sent
            got = await c.recv_n(4)
        await c.stream.aclose()
    events, final = got[:3], got[3]
    assert [e["id"] for e in events] == ["t"] * 3
    assert sorted(e["event"]["sector"] for e in events) == [3, 4, 5]
    for e in events:
        r = e["event"]
        assert r["op"] == "write" and r["lat_ns"] >= 1_000_000 and r["sectors"] == 8
    assert {e["event"]["sector"]: e["event"]["result"] for e in events}[4] == -5
    assert final == {"id": "t", "ok": True, "result": {"lost": 0, "sent": 3}}


async def test_trace_counts_the_records_it_lost(shm, autojump_clock):
    async with trio.open_nursery() as n:
        c = await serve(make_rpc(source=FakeSource({DEV: shm})), n)
        with trio.fail_after(60):
            await trace(c, 1, count=16)
            # 40 records on one queue before the server looks again: its ring keeps 16
            for i in range(40):
                record(shm, 0, WRITE, i)
            got = await c.recv_n(17)
        await c.stream.aclose()
    assert [e["event"]["sector"] for e in got[:16]] == list(range(24, 40))
    assert got[16] == {"id": 1, "ok": True, "result": {"lost": 24, "sent": 16}}


async def test_trace_from_start_sends_what_the_ring_holds(shm, autojump_clock):
    for i in range(3):
        record(shm, 1, READ, i)
    async with trio.open_nursery() as n:
        c = await serve(make_rpc(source=FakeSource({DEV: shm})), n)
        with trio.fail_after(60):
            await trace(c, 1, from_start=True, count=3)
            got = await c.recv_n(4)
        await c.stream.aclose()
    assert [e["event"]["sector"] for e in got[:3]] == [0, 1, 2]
    assert got[3]["result"] == {"lost": 0, "sent": 3}


async def test_trace_duration_ends_it_on_the_trio_clock(shm, autojump_clock):
    t0, real0 = trio.current_time(), time.monotonic()
    async with trio.open_nursery() as n:
        c = await serve(make_rpc(source=FakeSource({DEV: shm})), n)
        with trio.fail_after(3600):
            await trace(c, "d", duration="1m", filters=["q=1"])
            record(shm, 1, WRITE, 7)
            record(shm, 0, WRITE, 8)  # another queue
            first = await c.recv()
            final = await c.recv()
        elapsed = trio.current_time() - t0
        await c.stream.aclose()
    assert first["event"]["sector"] == 7
    assert final == {"id": "d", "ok": True, "result": {"lost": 0, "sent": 1}}
    assert 60 <= elapsed < 61
    assert time.monotonic() - real0 < 10  # a minute of trace time, not of the test's


async def test_a_client_hanging_up_ends_the_stream(shm, autojump_clock):
    rpc = make_rpc(source=FakeSource({DEV: shm}))
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            c = await serve(rpc, n)
            await trace(c, 1)  # no count, no duration: only the hang-up ends it
            record(shm, 0, WRITE, 1)
            assert (await c.recv())["event"]["sector"] == 1
            await c.stream.aclose()
        # the nursery is done: the trace task and the connection ended


async def test_two_traces_and_a_request_on_one_connection(shm, verbs, autojump_clock):
    async with trio.open_nursery() as n:
        c = await serve(make_rpc(verbs, source=FakeSource({DEV: shm})), n)
        with trio.fail_after(60):
            await trace(c, "r", filters=["op=read"], count=2)
            await trace(c, "w", filters=["op=write"], count=3)
            for i in range(3):
                record(shm, 0, READ, 100 + i)
                record(shm, 1, WRITE, 200 + i)
            # answered between the streams' lines
            await c.send(id="p", cmd="ping")
            got = await c.recv_n(2 + 1 + 3 + 1 + 1)
        await c.stream.aclose()
    by_id = {}
    for m in got:
        by_id.setdefault(m["id"], []).append(m)
    assert [m["event"]["sector"] for m in by_id["r"][:2]] == [100, 101]
    assert by_id["r"][2] == {"id": "r", "ok": True, "result": {"lost": 0, "sent": 2}}
    assert [m["event"]["sector"] for m in by_id["w"][:3]] == [200, 201, 202]
    assert by_id["w"][3] == {"id": "w", "ok": True, "result": {"lost": 0, "sent": 3}}
    assert by_id["p"][0]["ok"] is True


async def test_trace_of_a_device_without_statistics_is_one_error(verbs, autojump_clock):
    async with trio.open_nursery() as n:
        c = await serve(make_rpc(verbs), n)
        with trio.fail_after(60):
            await c.send(id=1, cmd="trace", args={"id": 3})
            assert await c.recv() == {"id": 1, "ok": False,
                                      "error": "device 3 has no statistics (not served by ublkshell?)"}
            await c.send(id=2, cmd="trace", args={"id": 3, "bogus": 1})
            assert (await c.recv())["ok"] is False
            await c.send(id=3, cmd="ping")
            assert (await c.recv())["id"] == 3
        await c.stream.aclose()


# -- supervision ----------------------------------------------------------------
@pytest.fixture
def watch_clock():
    """trio's clock, jumping ahead only after 10 ms of real idleness. The watch waits on
    worker threads (the registry, the kernel, a recovery): with a clock that jumps the moment
    every task waits, the watch's sleeps would race through minutes of trio time during one
    thread hop, and a fail_after on that clock would fire while nothing is wrong."""
    return trio.testing.MockClock(autojump_threshold=0.01)


class FakeRegistry:
    """registry.all_entries and procs.entry_daemon_alive over a dict the test changes. The
    watch reads the registry in a worker thread: each look takes the entries and whether
    their daemons live at one moment, so a change the test makes is seen whole or not at all."""

    def __init__(self, monkeypatch):
        self.entries = {}
        self.alive = set()
        self.looks = 0
        self.fail_next = 0
        self.stale_marks = False  # all_entries shows entries as they were before `kill` marked them
        self.lock = threading.Lock()
        monkeypatch.setattr(registry, "all_entries", self.all_entries)
        monkeypatch.setattr(registry, "read", self.read)
        monkeypatch.setattr(procs, "entry_daemon_alive", lambda e, *a, **k: e["_alive"])
        monkeypatch.setattr(sup_mod, "kernel_state", lambda dev_id: "QUIESCED")

    def all_entries(self) -> dict:
        self.looks += 1
        if self.fail_next:
            self.fail_next -= 1
            raise OSError("registry unreadable")
        with self.lock:
            out = {d: dict(e, _alive=e["pid"] in self.alive) for d, e in self.entries.items()}
        if self.stale_marks:
            for e in out.values():
                e.pop("killed_pid", None)
        return out

    def read(self, dev_id: int):
        with self.lock:
            e = self.entries.get(dev_id)
            return dict(e) if e is not None else None

    def put(self, dev_id: int, entry: dict, alive: bool = True) -> None:
        with self.lock:
            self.entries[dev_id] = entry
            if alive:
                self.alive.add(entry["pid"])

    def die(self, *pids) -> None:
        with self.lock:
            self.alive -= set(pids)

    def remove(self, dev_id: int) -> None:
        with self.lock:
            del self.entries[dev_id]

    async def looked(self, times: int = 2) -> None:
        """Until the watch has looked at least `times` more times (on the trio clock)."""
        until = self.looks + times
        while self.looks < until:
            await trio.sleep(WATCH_S / 4)


def kinds(events) -> list:
    return [e["kind"] for e in events.recent]


async def wait_for(pred) -> None:
    while not pred():
        await trio.sleep(WATCH_S / 4)


async def test_watch_reports_added_died_recovered_killed_deleted_in_order(monkeypatch, shm, watch_clock):
    reg = FakeRegistry(monkeypatch)
    events = Events()
    shm.queue(1).inflight = 2  # the tags the dead daemon was serving
    sup = Supervisor(events, FakeSource({DEV: shm}))
    with trio.fail_after(600):
        async with trio.open_nursery() as n:
            n.start_soon(sup.watch, n)
            reg.put(DEV, {"pid": 100, "recovery": "requeue"})
            await reg.looked(3)
            reg.die(100)
            await wait_for(lambda: len(events.recent) == 2)
            await reg.looked(3)
            reg.put(DEV, {"pid": 200, "recovery": "requeue", "recoveries": 1, "abandoned": 2})
            await reg.looked(3)
            reg.put(DEV, dict(reg.entries[DEV], killed_pid=200))  # what `kill` writes first
            await reg.looked(2)
            reg.die(200)
            await wait_for(lambda: len(events.recent) == 4)
            await reg.looked(3)
            reg.remove(DEV)
            await reg.looked(3)
            n.cancel_scope.cancel()
    assert kinds(events) == ["device-added", "daemon-died", "daemon-recovered", "daemon-killed",
                             "device-deleted"]
    added, died, recovered, killed, deleted = ({k: v for k, v in e.items() if k != "t"} for e in events.recent)
    # each names its device as people type it, beside the numeric handle (docs/schema.md, event)
    named = {"id": DEV, "device": str(DEV)}
    assert added == {"kind": "device-added", **named, "pid": 100}
    assert died == {"kind": "daemon-died", **named, "pid": 100, "state": "QUIESCED",
                    "recovery": "requeue", "inflight": 2}
    assert recovered == {"kind": "daemon-recovered", **named, "pid": 200, "old_pid": 100,
                         "recoveries": 1, "abandoned": 2}
    assert killed["kind"] == "daemon-killed" and killed["pid"] == 200
    assert deleted == {"kind": "device-deleted", **named}
    for e in events.recent:
        schema.check("event", e)


async def test_a_kill_marked_after_the_watch_read_the_registry_is_still_a_kill(monkeypatch, shm, watch_clock):
    reg = FakeRegistry(monkeypatch)
    events = Events()
    sup = Supervisor(events, FakeSource({DEV: shm}))
    with trio.fail_after(600):
        async with trio.open_nursery() as n:
            n.start_soon(sup.watch, n)
            reg.put(DEV, {"pid": 100})
            await reg.looked(3)
            # the watch's look at the registry predates the mark; the death comes after it
            reg.stale_marks = True
            reg.put(DEV, dict(reg.entries[DEV], killed_pid=100))
            reg.die(100)
            await wait_for(lambda: len(events.recent) == 2)
            n.cancel_scope.cancel()
    assert kinds(events) == ["device-added", "daemon-killed"]


async def test_keep_restarts_a_loop_that_raised_and_logs_it(capsys, watch_clock):
    runs = []

    async def loop(arg):
        runs.append(trio.current_time())
        if len(runs) < 3:
            raise RuntimeError(f"boom {len(runs)}")
        return arg

    with trio.fail_after(60):
        assert await keep("test loop", loop, "done") == "done"
    assert len(runs) == 3 and runs[2] - runs[0] >= 2  # a second between tries
    err = capsys.readouterr().err
    assert "test loop failed, restarting it in 1 s: RuntimeError: boom 1" in err
    assert "RuntimeError: boom 2" in err and "Traceback" in err


async def test_the_watch_goes_on_after_the_registry_could_not_be_read(monkeypatch, capsys, watch_clock):
    reg = FakeRegistry(monkeypatch)
    reg.fail_next = 2
    events = Events()
    sup = Supervisor(events, FakeSource())
    reg.put(3, {"pid": 100})
    with trio.fail_after(600):
        async with trio.open_nursery() as n:
            n.start_soon(keep, "daemon watch", sup.watch, n)
            await wait_for(lambda: events.recent)
            n.cancel_scope.cancel()
    assert kinds(events) == ["device-added"]
    assert capsys.readouterr().err.count("daemon watch failed, restarting it in 1 s: OSError: registry unreadable") == 2


class FakeRecover:
    """devices.recovery.recover, run in a worker thread: blocks until released, then returns
    the new daemon (or raises what the test chose)."""

    def __init__(self, monkeypatch, raises=None):
        self.calls = []
        self.release = threading.Event()
        self.raises = raises
        monkeypatch.setattr(recovery_mod, "recover", self)

    def __call__(self, dev_id: int) -> dict:
        self.calls.append(dev_id)
        if not self.release.wait(WAIT_S * 2):
            raise TimeoutError("never released")
        if self.raises:
            raise self.raises
        n = len(self.calls)
        return {"pid": 100 + n, "old_pid": 99 + n, "recoveries": n, "abandoned": 0, "seconds": 0.5}


async def test_auto_recover_recovers_once_per_death(monkeypatch, watch_clock):
    reg = FakeRegistry(monkeypatch)
    rec = FakeRecover(monkeypatch)
    events = Events()
    sup = Supervisor(events, FakeSource(), auto_recover=True)
    reg.put(3, {"pid": 100, "recovery": "reissue"})
    try:
        with trio.fail_after(600):
            async with trio.open_nursery() as n:
                n.start_soon(sup.watch, n)
                await reg.looked(2)
                reg.die(100)
                await wait_for(lambda: rec.calls)
                # the watch keeps seeing the dead daemon while the recovery runs
                await reg.looked(3)
                rec.release.set()
                await wait_for(lambda: "auto-recovered" in kinds(events))
                # a look at the registry from before the recovery rewrote it sees the same
                # death again: it is not a new one
                await reg.looked(3)
                reg.put(3, {"pid": 101, "recovery": "reissue", "recoveries": 1})
                await reg.looked(3)
                assert rec.calls == [3]
                # the new daemon dies too: a second death, a second recovery
                reg.die(101)
                await wait_for(lambda: kinds(events).count("auto-recovered") == 2)
                await reg.looked(3)
                n.cancel_scope.cancel()
    finally:
        rec.release.set()
    assert rec.calls == [3, 3]
    assert kinds(events) == ["device-added", "daemon-died", "auto-recovered", "daemon-died", "auto-recovered"]
    first = events.recent[2]
    assert (first["pid"], first["old_pid"], first["recoveries"], first["seconds"]) == (101, 100, 1, 0.5)


@pytest.mark.parametrize("exc, error", [
    (UblkError("device 3: no recovery mode"), "device 3: no recovery mode"),
    (KeyError("pid"), "internal error: KeyError: 'pid'"),
])
async def test_a_failed_auto_recover_is_reported(monkeypatch, watch_clock, exc, error):
    reg = FakeRegistry(monkeypatch)
    rec = FakeRecover(monkeypatch, raises=exc)
    rec.release.set()
    events = Events()
    sup = Supervisor(events, FakeSource(), auto_recover=True)
    reg.put(3, {"pid": 100, "recovery": "requeue"})
    with trio.fail_after(600):
        async with trio.open_nursery() as n:
            n.start_soon(sup.watch, n)
            await reg.looked(2)
            reg.die(100)
            await wait_for(lambda: "auto-recover-failed" in kinds(events))
            await reg.looked(3)
            n.cancel_scope.cancel()
    assert rec.calls == [3]
    assert kinds(events) == ["device-added", "daemon-died", "auto-recover-failed"]
    assert events.recent[-1]["error"] == error


async def test_no_auto_recover_without_a_recovery_mode_or_for_a_dead_device(monkeypatch, watch_clock):
    reg = FakeRegistry(monkeypatch)
    rec = FakeRecover(monkeypatch)
    rec.release.set()
    states = {3: "QUIESCED", 4: "DEAD"}
    monkeypatch.setattr(sup_mod, "kernel_state", lambda dev_id: states[dev_id])
    events = Events()
    sup = Supervisor(events, FakeSource(), auto_recover=True)
    reg.put(3, {"pid": 100})
    reg.put(4, {"pid": 101, "recovery": "requeue"})
    with trio.fail_after(600):
        async with trio.open_nursery() as n:
            n.start_soon(sup.watch, n)
            await reg.looked(2)
            reg.die(100, 101)
            await wait_for(lambda: kinds(events).count("daemon-died") == 2)
            await reg.looked(3)
            n.cancel_scope.cancel()
    assert rec.calls == []


async def test_no_second_recovery_while_one_runs(monkeypatch, watch_clock):
    reg = FakeRegistry(monkeypatch)
    rec = FakeRecover(monkeypatch)
    events = Events()
    sup = Supervisor(events, FakeSource(), auto_recover=True)
    reg.put(3, {"pid": 100, "recovery": "requeue"})
    try:
        with trio.fail_after(600):
            async with trio.open_nursery() as n:
                n.start_soon(sup.watch, n)
                await reg.looked(2)
                reg.die(100)
                await wait_for(lambda: rec.calls)
                # meanwhile someone else recovered it by hand, and that daemon died too
                reg.put(3, {"pid": 200, "recovery": "requeue", "recoveries": 1})
                await wait_for(lambda: "daemon-recovered" in kinds(events))
                reg.die(200)
                await wait_for(lambda: kinds(events).count("daemon-died") == 2)
                await reg.looked(3)
                assert rec.calls == [3]  # the running recovery is the one
                rec.release.set()
                await wait_for(lambda: "auto-recovered" in kinds(events))
                n.cancel_scope.cancel()
    finally:
        rec.release.set()
    assert rec.calls == [3]
    assert kinds(events) == ["device-added", "daemon-died", "daemon-recovered", "daemon-died", "auto-recovered"]
