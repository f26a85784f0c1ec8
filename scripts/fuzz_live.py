#!/usr/bin/env python3
"""Fuzz a live ublkshell server with hostile input, then prove nothing broke.

    scripts/fuzz.sh [--messages N] [--fault-writes N] [--seed S]   (boots the VM when needed)
    python scripts/fuzz_live.py ...                                (here, as root)

What it does: starts a server on a private socket, state directory and stats
tree; adds two devices (ublk when this kernel has ublk_drv, else the FUSE
transport with loop devices) and writes known data to them; then sends
--messages requests over the socket from several connections (mutations of
every command's arguments: wrong types, huge and negative numbers, NaN,
non-ASCII digits, deep nesting, garbage bytes, invalid UTF-8, pipelined lines,
oversized lines) while another thread writes --fault-writes lines to the
devices' `faults` files (valid rules, hostile rules, partial lines ended by
close, non-UTF-8). Destructive requests only ever name devices that do not
exist (a `del` of a real device would be no bug).

It fails (exit 1) if any reply is an internal error, a request goes
unanswered, the server's pid changes, a faults write fails with anything but
EINVAL/EFBIG/ENOSPC, the server logs a failure, or at the end a device is
gone or its data differs. It prints the figures docs/reliability.md records.
"""
import argparse
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

MiB = 1 << 20
PY = sys.executable
VERBS = ["add", "del", "list", "features", "stats", "lat", "inflight", "delay", "fail", "drop", "corrupt",
         "torn", "hang", "flakey", "badblocks", "faults", "clear", "seed", "powercut", "kill", "recover",
         "trace", "events", "ping", "shutdown", "frob", "", "STATS", "stats ", "del\x00"]
DESTRUCTIVE = {"del", "kill", "recover", "powercut", "shutdown"}
ARG_NAMES = ["id", "ids", "all", "words", "rule", "seed", "keep", "partial", "target", "size", "depth",
             "queues", "dev_id", "file", "json", "op", "recovery", "max_io", "block_size", "transport", "loop",
             "filters", "count", "from_start", "duration", "last", "delete", "frob", "", "x" * 300]
ACTIONS = ["delay", "fail", "drop", "corrupt", "torn", "hang", "flakey", "badblocks"]


class Hostile:
    """Values and words a hostile user might send."""

    def __init__(self, rng: random.Random):
        self.r = rng

    def number_text(self) -> str:
        r = self.r
        return r.choice([str(r.randrange(0, 64)), str(r.randrange(-2**70, 2**70)), "9" * r.randrange(20, 5000),
                         "-0", "0x1f", "1_000", "١٢", "１２", "1e400", "nan", "inf", "-inf", "", " ", "1.5", ".",
                         "..", "0..", "..7", "5..3", "0.." + str(2**64), str(2**64), str(2**63), str(2**32)])

    def value(self, depth: int = 0):
        r = self.r
        k = r.randrange(12 if depth < 2 else 9)
        if k == 0:
            return r.randrange(-2**65, 2**65)
        if k == 1:
            return r.choice([0, 1, -1, 7, 2**31, 2**63, 2**64, -2**63])
        if k == 2:
            return r.choice([1.5, -0.0, 1e300, 2.5, 0.5])
        if k == 3:
            return r.choice([True, False, None])
        if k == 4:
            return self.number_text()
        if k == 5:
            return r.choice(["fuse0", "fuse", "fuse99999999", "0", "mem", "loop", "null", "1G", "5ms",
                             "99999999999999T", "1.5e400k", "requeue", "/etc/passwd", "/dev/shm", "a\x00b",
                             "\u202e\u0000", "\udcff", "x" * r.randrange(1, 9000)])
        if k == 6:
            return "".join(chr(r.randrange(1, 0x3000)) for _ in range(r.randrange(0, 20)))
        if k == 7:
            return self.rule_words()
        if k == 8:
            return " ".join(self.rule_words())
        if k == 9:
            return [self.value(depth + 1) for _ in range(r.randrange(0, 6))]
        if k == 10:
            return {r.choice(ARG_NAMES): self.value(depth + 1) for _ in range(r.randrange(0, 4))}
        return [[[[[[1]]]]]]

    def rule_words(self) -> list:
        r = self.r
        pool = ["5ms", "1ms..50ms", "0s", "61s", "q=0", "q=" + self.number_text(), "tag", str(r.randrange(0, 9)),
                "tag=" + self.number_text(), "op=read", "op=write,flush", "op=" + self.number_text(),
                "lba", "0..7", "lba=" + self.number_text(), f"lba={r.randrange(0, 4096)}..{r.randrange(4096, 9000)}",
                "size=4k..64k", "size=" + self.number_text() + "k", "fua", "p=0.5", "p=" + self.number_text(),
                "count=" + self.number_text(), "count=3", "errno=EIO", "errno=ENOSPC", "errno=" + self.number_text(),
                "byte=17", "byte=" + self.number_text(), "sectors=8", "sectors=" + self.number_text(),
                "up=1s", "down=1s", "up=" + self.number_text() + "s", "mode=drop", "mode=x", "=", "==", "a=b=c",
                f"{r.randrange(0, 2**40)}..{r.randrange(2**40, 2**62)}", "0.." + str(2**63 + 5), "x" * 5000]
        return [r.choice(pool) for _ in range(r.randrange(0, 8))]

    def rule_line(self) -> bytes:
        r = self.r
        k = r.randrange(10)
        if k == 0:
            return bytes(r.randrange(256) for _ in range(r.randrange(1, 60)))
        if k == 1:
            return r.choice([b"clear", b"clear 1", b"clear x", b"clear 1 2", b"seed 7", b"seed -1",
                             b"seed " + b"9" * 40, b"# comment", b"", b"\n\n\n"])
        words = [r.choice(ACTIONS + ["frob", ""])] + self.rule_words()
        return " ".join(words).encode()


class Server:
    def __init__(self, root: str, env: dict):
        self.root, self.env = root, env
        self.sock = os.path.join(root, "s.sock")
        self.tree = os.path.join(root, "tree")
        self.log = open(os.path.join(root, "server.log"), "wb")
        self.proc = subprocess.Popen([PY, "-m", "ublkshell", "serve", "--socket", self.sock, "--mount", self.tree],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd="/")
        deadline = time.monotonic() + 60
        while not (os.path.exists(self.sock) and os.path.ismount(self.tree)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"fuzz: the server did not start: {self.log_text()[-2000:]}")
            time.sleep(0.05)
        self.pid = self.call("ping")["pid"]

    def call(self, cmd: str, **args):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(300)
        s.connect(self.sock)
        try:
            s.sendall((json.dumps({"id": 1, "cmd": cmd, "args": args}) + "\n").encode())
            f = s.makefile("rb")
            while True:
                msg = json.loads(f.readline())
                if "ok" in msg:
                    if not msg["ok"]:
                        raise RuntimeError(f"{cmd}: {msg['error']}")
                    return msg.get("result")
        finally:
            s.close()

    def rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))

    def log_text(self) -> str:
        with open(os.path.join(self.root, "server.log"), errors="replace") as f:
            return f.read()


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.n = {}
        self.bad = []

    def add(self, key: str, k: int = 1) -> None:
        with self.lock:
            self.n[key] = self.n.get(key, 0) + k

    def fail(self, what: str) -> None:
        with self.lock:
            self.n["FAILURES"] = self.n.get("FAILURES", 0) + 1
            if len(self.bad) < 20:
                self.bad.append(what[:300])


def well_formed(h: Hostile, real_ids: list) -> dict:
    """A request of the right shape for a real device, so that it gets past the argument
    checks into the verb itself (one field may still be hostile)."""
    r = h.r
    dev = r.choice(real_ids)
    cmd = r.choice(["stats", "lat", "inflight", "faults", "list", "features", "events", "ping", "trace",
                    "seed", "clear", "delay", "fail", "drop", "corrupt", "torn", "hang", "flakey", "badblocks"])
    args = {"id": dev}
    if cmd in ("list", "features", "events", "ping"):
        args = {"last": r.randrange(1, 201)} if cmd == "events" else {}
    elif cmd == "lat":
        args["op"] = r.choice(["read", "write", "flush", "discard", "write_zeroes", "other", "bogus"])
    elif cmd == "trace":
        args.update(filters=r.choice([[], ["op=write"], ["q=0", "errors"], ["lba=0..99", "min_lat=1us"]]),
                    count=r.randrange(0, 3), from_start=r.random() < 0.5)
    elif cmd == "seed":
        args["seed"] = r.choice([None, r.randrange(0, 2**64)])
    elif cmd == "clear":
        args["rule"] = r.choice([None, r.randrange(1, 50)])
    elif cmd not in ("stats", "inflight", "faults"):
        args["words"] = h.rule_words()
    if r.random() < 0.2:
        args[r.choice(list(args) or ["id"])] = h.value()
    return {"id": r.randrange(1, 1 << 30), "cmd": cmd, "args": args}


def one_message(h: Hostile, real_ids: list) -> tuple[bytes, int]:
    """(bytes to send, replies expected). Destructive commands never name a real device."""
    r = h.r
    k = r.randrange(100)
    if k >= 60:
        msg = well_formed(h, real_ids)
        if msg["cmd"] == "trace":
            msg["args"]["duration"] = "0.2s"
        return json.dumps(msg).encode() + b"\n", 1
    if k < 3:
        junk = bytes(r.randrange(256) for _ in range(r.randrange(1, 200))).replace(b"\n", b" ")
        return junk + b"\n", 1 if junk.strip() else 0
    if k < 5:
        return (r.choice(["[", "{\"a\":", "[{\"b\":"]) * r.randrange(30, 3000)).encode() + b"\n", 1
    if k < 6:
        return b'{"id": 1, "cmd": "ping", "args": {"n": ' + r.choice([b"NaN", b"Infinity", b"-Infinity"]) + b"}}\n", 1
    cmd = r.choice(VERBS)
    args = {}
    for _ in range(r.randrange(0, 5)):
        args[r.choice(ARG_NAMES)] = h.value()
    if r.random() < 0.5 and cmd not in DESTRUCTIVE:
        args["id"] = r.choice(real_ids + ["fuse0", 0, 1])
    if cmd in DESTRUCTIVE or cmd == "add":
        for key in ("id", "ids"):
            if key in args:
                args[key] = r.choice([9999, "fuse9999", 1048575, [9998, "fuse9998"], h.value()])
        if args.get("all") not in (None, False, 0) and cmd == "del":
            args["all"] = r.choice(["yes", 2, [], {}])
        if cmd == "shutdown":
            args["delete"] = r.choice(["yes", 2, [1], {"a": 1}])  # a valid shutdown would end the run
        if cmd == "recover" or cmd == "kill":
            args.setdefault("id", 9999)
        if "file" in args:
            # never a real file: an added loop device over it would be a way to write to it
            args["file"] = r.choice(["/nonexistent/disk.img", "", "a\x00b", 7, ["x"]])
    if cmd == "trace":
        # a stream on a real device ends by itself, or the client would wait for it
        args["duration"] = "0.2s"
    rid = r.choice([r.randrange(1, 1 << 40), "r" + str(r.randrange(10**6)), None, 1.5, [1], True])
    msg = {"id": rid, "cmd": cmd, "args": args}
    if r.random() < 0.05:
        # a shutdown without its (invalid) arguments would really stop the server
        msg = {k2: v for k2, v in msg.items() if r.random() < 0.7 or (cmd == "shutdown" and k2 == "args")}
    try:
        line = json.dumps(msg, ensure_ascii=r.random() < 0.5).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        return b'{"id": 2, "cmd": "ping"}\n', 1
    return line + b"\n", 1


def client(server: Server, h: Hostile, n: int, real_ids: list, stats: Stats, stop: threading.Event) -> None:
    sock = None
    f = None
    for i in range(n):
        if stop.is_set():
            return
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(120)
            sock.connect(server.sock)
            f = sock.makefile("rb")
        data, expect = one_message(h, real_ids)
        if h.r.random() < 0.0005:
            data = b'{"id": 1, "cmd": "ping", "args": {"pad": "' + b"x" * (1 << 20) + b'"}}\n'
            expect = -1  # an oversized request: one error, then the server hangs up
        try:
            sock.sendall(data)
            stats.add("messages")
            got, want = 0, (1 if expect == -1 else expect)
            while got < want:
                line = f.readline()
                if not line:
                    if expect == -1:
                        break
                    stats.fail(f"connection closed after {data[:200]!r}")
                    break
                msg = json.loads(line)
                if "event" in msg or msg.get("started"):
                    continue
                got += 1
                if msg.get("ok"):
                    stats.add("replies ok")
                else:
                    stats.add("replies refused")
                    err = msg.get("error", "")
                    if "internal error" in err or "\n" in err or not err:
                        stats.fail(f"{err!r} for {data[:200]!r}")
        except (OSError, ValueError) as e:
            if expect != -1:
                stats.fail(f"{type(e).__name__}: {e} after {data[:200]!r}")
            sock.close()
            sock = None
            continue
        if expect == -1 or h.r.random() < 0.01:
            sock.close()
            sock = None
            stats.add("reconnects")
        if i % 1000 == 0:
            try:
                if server.call("ping")["pid"] != server.pid:
                    stats.fail("the server was replaced")
            except Exception as e:  # noqa: BLE001
                stats.fail(f"ping failed: {e}")
    if sock is not None:
        sock.close()


def fault_writer(server: Server, h: Hostile, n: int, stems: list, stats: Stats, stop: threading.Event) -> None:
    for i in range(n):
        if stop.is_set():
            return
        path = os.path.join(server.tree, h.r.choice(stems), "faults")
        line = h.rule_line()
        ending = h.r.choice([b"\n", b"", b"\n" + h.rule_line() + b"\n"])
        if i % 50 == 0:
            line, ending = b"clear", b"\n"  # keep slots free so valid rules keep landing
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        except OSError as e:
            stats.fail(f"open {path}: {e}")
            continue
        code = 0
        try:
            os.write(fd, line + ending)
        except OSError as e:
            code = e.errno
        try:
            os.close(fd)
        except OSError as e:
            code = code or e.errno
        stats.add("fault writes")
        if code == 0:
            stats.add("fault writes taken")
        elif code in (errno.EINVAL, errno.EFBIG):
            stats.add("fault writes refused")
        else:
            stats.fail(f"faults write {line[:120]!r}: {os.strerror(code)}")


def checksum(path: str, nbytes: int) -> str:
    with open(path, "rb", buffering=0) as f:
        return hashlib.sha256(f.read(nbytes)).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--fault-writes", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("fuzz: run as root (the server mounts its tree and adds devices)")
    ublk = os.path.exists("/dev/ublk-control")
    root = f"/dev/shm/ublkshell-fuzz-{os.getpid()}"
    os.makedirs(root, mode=0o700)
    env = dict(os.environ, UBLKSHELL_STATE_DIR=os.path.join(root, "state"),
               UBLKSHELL_DATA_DIR=os.path.join(root, "data"))
    stats, stop = Stats(), threading.Event()
    server = None
    devs = []
    try:
        server = Server(root, env)
        img = os.path.join(root, "disk.img")
        with open(img, "wb") as f:
            f.truncate(64 * MiB)
        for args in ({"target": "mem", "size": "64M"}, {"target": "loop", "file": img}):
            if not ublk:
                args.update(transport="fuse", loop=True)
            devs.append(server.call("add", **args))
        paths = [d.get("loop") if d.get("transport") == "fuse" else f"/dev/ublkb{d['id']}" for d in devs]
        stems = [d["name"] if d.get("transport") == "fuse" else f"ublkb{d['id']}" for d in devs]
        rng = random.Random(a.seed)
        for p in paths:
            with open(p, "r+b", buffering=0) as f:
                f.write(rng.randbytes(16 * MiB))
                os.fsync(f.fileno())
        sums = [checksum(p, 16 * MiB) for p in paths]
        rss0 = server.rss_kb()
        real_ids = [d["id"] for d in devs]
        t0 = time.monotonic()
        threads = [threading.Thread(target=client, daemon=True, args=(server, Hostile(random.Random(a.seed * 100 + i)),
                                                         a.messages // a.clients, real_ids, stats, stop))
                   for i in range(a.clients)]
        threads.append(threading.Thread(target=fault_writer, daemon=True, args=(server, Hostile(random.Random(a.seed * 7)),
                                                                   a.fault_writes, stems, stats, stop)))
        for t in threads:
            t.start()
        last = progress_at = time.monotonic()
        progress = None
        while any(t.is_alive() for t in threads):
            time.sleep(1)
            now = time.monotonic()
            seen = (stats.n.get("messages", 0), stats.n.get("fault writes", 0))
            if seen != progress:
                progress, progress_at = seen, now
            elif now - progress_at > 120:
                # a request or a faults write that never returns is a failure, not a reason to wait
                stats.fail(f"no progress for 120 s at {seen[0]} messages, {seen[1]} faults writes")
                break
            if now - last > 30:
                last = now
                print(f"fuzz: {seen[0]} messages, {seen[1]} faults writes, {stats.n.get('FAILURES', 0)} "
                      f"failures, {now - t0:.0f} s", flush=True)
        elapsed = time.monotonic() - t0
        # the end: the same server, every device alive with its data, no failure in the log
        if server.call("ping")["pid"] != server.pid or server.proc.poll() is not None:
            stats.fail("the server is not the one that started")
        if ublk:
            for d in devs:
                server.call("clear", id=d["id"])
        listed = {d["id"]: d for d in server.call("list")}
        for d, p, want in zip(devs, paths, sums):
            if d["id"] not in listed or not listed[d["id"]]["daemon_alive"]:
                stats.fail(f"device {d['id']} is gone or its daemon died")
            elif checksum(p, 16 * MiB) != want:
                stats.fail(f"device {d['id']}: its data changed")
        extra_devs = [i for i in listed if i not in real_ids]
        for i in extra_devs:  # random adds that happened to be valid
            server.call("del", ids=[i])
        rss1 = server.rss_kb()
        log = server.log_text()
        for marker in ("internal error", "restarting it", "Traceback", "connection failed"):
            if marker in log:
                stats.fail(f"the server log says {marker!r}")
        figures = {"messages": stats.n.get("messages", 0), "replies_ok": stats.n.get("replies ok", 0),
                   "replies_refused": stats.n.get("replies refused", 0), "reconnects": stats.n.get("reconnects", 0),
                   "fault_writes": stats.n.get("fault writes", 0),
                   "fault_writes_taken": stats.n.get("fault writes taken", 0),
                   "fault_writes_refused": stats.n.get("fault writes refused", 0),
                   "devices_added_by_fuzz": len(extra_devs), "failures": stats.n.get("FAILURES", 0),
                   "seconds": round(elapsed, 1), "server_rss_kb_before": rss0, "server_rss_kb_after": rss1,
                   "transport": "ublk" if ublk else "fuse", "seed": a.seed, "kernel": os.uname().release}
        print(json.dumps(figures, indent=1))
        for b in stats.bad:
            print(f"fuzz: FAILURE: {b}", file=sys.stderr)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(figures, f, indent=1)
        return 1 if stats.n.get("FAILURES") else 0
    finally:
        stop.set()
        if server is not None:
            for d in devs:
                try:
                    server.call("del", ids=[d["id"]])
                except Exception as e:  # noqa: BLE001
                    print(f"fuzz: deleting {d['id']}: {e}", file=sys.stderr)
            server.proc.send_signal(signal.SIGTERM)
            try:
                server.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.proc.kill()
        subprocess.run(["umount", "-l", os.path.join(root, "tree")], capture_output=True)
        if server is not None and (stats.n.get("FAILURES") or sys.exc_info()[0] is not None):
            keep = f"/tmp/ublkshell-fuzz-{os.getpid()}.log"
            shutil.copy(os.path.join(root, "server.log"), keep)
            print(f"fuzz: the server's log is kept in {keep}", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
