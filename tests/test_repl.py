"""The interactive shell, driven for real: a server subprocess on a temporary
socket, a device's statistics file recorded into by this test (no ublk_drv on
the host, so no real device), and the shell in a pty through pexpect."""
import json
import os
import re
import subprocess
import sys
import time

import pexpect
import pytest

from ublkshell._native import lib
from ublkshell.observe import shm as shm_mod
from ublkshell.repl import views
from ublkshell.repl.completion import candidates
from ublkshell.repl.shell import Shell
from ublkshell.observe.stats import buckets

READ, WRITE = lib.UBLK_IO_OP_READ, lib.UBLK_IO_OP_WRITE
PROMPT = "ublk>"  # prompt_toolkit draws the trailing space as a cursor move
ACCEPTED = "\x1b[?2004l"  # bracketed paste off: the line was taken, its output follows
ESC = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def env(tmp_path):
    return dict(os.environ, UBLKSHELL_STATE_DIR=str(tmp_path / "state"),
                UBLKSHELL_DATA_DIR=str(tmp_path / "mem"), HOME=str(tmp_path),
                TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1", COLUMNS="200", LINES="50")


@pytest.fixture
def server(tmp_path, env):
    sock = str(tmp_path / "s.sock")
    p = subprocess.Popen([sys.executable, "-m", "ublkshell", "serve", "--socket", sock, "--no-fuse"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert p.poll() is None, p.stdout.read()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        yield sock
    finally:
        p.terminate()
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture
def dev7(tmp_path, monkeypatch):
    """Device 7's statistics where the server looks, with 10 writes and 3 reads."""
    monkeypatch.setenv("UBLKSHELL_DATA_DIR", str(tmp_path / "mem"))
    s = shm_mod.create(7, 2, 32, 1024, os.getpid())
    for i in range(10):
        lib.us_shm_record_io(s.base, i % 2, i, WRITE, 1000 + 8 * i, 8, 4096, 20_000)
    for i in range(3):
        lib.us_shm_record_io(s.base, 0, i, READ, 8 * i, 8, 4096, 5_000)
    yield s
    s.close()


@pytest.fixture
def repl(server, env, dev7):
    child = pexpect.spawn(sys.executable, ["-m", "ublkshell", "--socket", server], env=env,
                          encoding="utf-8", dimensions=(50, 200), timeout=15)
    try:
        child.expect_exact(PROMPT)
        yield child
    finally:
        if child.isalive():
            child.terminate(force=True)
        child.close()


def clean(text: str) -> str:
    return ESC.sub("", text)


def run(child, line: str) -> str:
    """Send one line, return what it printed before the next prompt."""
    child.sendline(line)
    child.expect_exact(ACCEPTED)
    child.expect_exact(PROMPT)
    return clean(child.before)


def shell_c(server, env, line):
    return subprocess.run([sys.executable, "-m", "ublkshell", "--socket", server, "-c", line],
                          capture_output=True, text=True, timeout=60, env=env)


# -- in a pty ---------------------------------------------------------------
def test_tab_completes_a_verb(repl):
    repl.send("st\t")
    repl.expect_exact("stats")
    repl.send(" 7\r")
    repl.expect_exact("write")
    repl.expect_exact(PROMPT)


def test_tab_tab_offers_the_targets(repl):
    repl.send("add -t \t\t")
    repl.expect(r"null\s+mem\s+loop")
    repl.sendcontrol("u")
    repl.sendline("quit")
    repl.expect(pexpect.EOF)


def test_bad_command_is_one_line_and_the_prompt_returns(repl):
    for line, message in [
        ("frob", "unknown command 'frob' (`help` lists them)"),
        ("stats 'unbalanced", "cannot split the line: No closing quotation"),
        ("stats 12345", "device 12345 has no statistics (not served by ublkshell?)"),
        ("stats", "the following arguments are required: id"),
        ("top 7 --interval 0", "--interval: 0 is out of range (10ms..24h)"),
    ]:
        out = run(repl, line).strip().splitlines()
        assert out == [f"error: {message}"], (line, out)


def test_stats_shows_the_recorded_counts(repl, tmp_path):
    lines = run(repl, "stats 7 --queues").splitlines()
    write = next(l for l in lines if l.startswith("write"))
    read = next(l for l in lines if l.startswith("read"))
    assert write.split()[1:3] == ["10", "40K"] and read.split()[1:3] == ["3", "12K"]
    assert next(l for l in lines if l.startswith("q1 write")).split()[2] == "5"
    repl.sendline("quit")
    repl.expect(pexpect.EOF)
    repl.close()
    assert repl.exitstatus == 0
    assert "stats 7 --queues" in (tmp_path / ".local/state/ublkshell/history").read_text()


def test_trace_follows_new_records_until_ctrl_c(repl, dev7):
    repl.sendline("trace 7")
    repl.expect_exact("TIME(s)")
    # the server starts its tail when the request lands: keep recording until one shows
    deadline = time.monotonic() + 15
    while True:
        lib.us_shm_record_io(dev7.base, 1, 9, WRITE, 777000, 16, 8192, 30_000)
        try:
            repl.expect(r"q1\s+t9\s+write\s+-\s+777000\+16", timeout=0.3)
            break
        except pexpect.TIMEOUT:
            assert time.monotonic() < deadline, clean(repl.before)
    repl.sendintr()
    repl.expect_exact(PROMPT)
    # the shell still answers after the interrupted stream
    assert re.search(r"^write\s+1\d\s", run(repl, "stats 7"), re.M)


def test_top_is_full_screen_until_q(repl, dev7):
    repl.sendline("top 7 --interval 0.2")
    repl.expect_exact("IOPS")
    repl.expect_exact("write")
    repl.expect_exact("(q: quit)")
    repl.send("q")
    repl.expect_exact(PROMPT)
    # and the shell still answers
    assert re.search(r"^write\s+1\d\s", run(repl, "stats 7"), re.M)


def test_top_count_prints_plain_frames_of_the_interval(repl, dev7):
    repl.sendline("top 7 --interval 0.3 --count 2")
    for _ in range(6):
        lib.us_shm_record_io(dev7.base, 1, 9, WRITE, 4096, 8, 4096, 30_000)
        time.sleep(0.1)
    out = ""
    for _ in range(2):
        repl.expect_exact("INFL")
        repl.expect(r"ublkshell top|ublk>")
        out += ESC.sub("", repl.before)
    # the writes of the interval only, at the latency they were recorded with
    assert re.search(r"^7\s+all write\s+\d+(\.\d)?\s+0\.0\d\s+3\d(\.\d)?us\s+3\d(\.\d)?us", out, re.M), out


def test_help_and_quit(repl):
    out = run(repl, "help")
    for verb in ("add", "del", "list", "info", "features", "stats", "lat", "inflight", "trace", "top", "quit"):
        assert re.search(rf"^\s+{verb}\s+\S", out, re.M), verb
    assert "usage: lat" in run(repl, "help lat")
    repl.sendintr()  # Ctrl-C on an empty line: just a new prompt
    repl.expect_exact(PROMPT)
    repl.sendline("quit")
    repl.expect(pexpect.EOF)
    repl.close()
    assert repl.exitstatus == 0


def test_ctrl_d_leaves(repl):
    repl.sendeof()
    repl.expect(pexpect.EOF)
    repl.close()
    assert repl.exitstatus == 0


# -- ublkshell -c -------------------------------------------------------------
def test_c_runs_one_line_through_the_server(server, env, dev7):
    p = shell_c(server, env, "stats 7 --json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["device"] == "7"
    assert r["ops"]["write"]["ios"] == 10 and r["ops"]["write"]["bytes"] == 40960
    assert r["ops"]["read"]["ios"] == 3
    assert [q["ops"]["write"]["ios"] for q in r["queues"]] == [5, 5]


def test_c_info_and_trace_from_start(server, env, dev7):
    p = shell_c(server, env, "info 7")
    assert p.returncode == 0, p.stderr
    assert "dev 7: 0 in flight" in p.stdout
    p = shell_c(server, env, "trace 7 --from-start --count 2 --json op=read")
    assert p.returncode == 0, p.stderr
    recs = [json.loads(l) for l in p.stdout.splitlines()]
    assert [(r["op"], r["sector"]) for r in recs] == [("read", 0), ("read", 8)]


@pytest.mark.parametrize("line,code,message", [
    ("frob", 2, "ublkshell: unknown command 'frob' (`help` lists them)"),
    ("stats x", 2, "ublkshell: argument id: 'x' is not a device id (a number like 0, or fuseN for a FUSE device)"),
    ("trace 7 op=nope", 2, "ublkshell: trace filter op=nope: 'nope' is not an op (choose from read, write, flush, "
     "discard, write_zeroes, zone_open, zone_close, zone_finish, zone_append, zone_reset_all, zone_reset, "
     "report_zones, or several: op=write,flush)"),
    ("serve", 2, "ublkshell: unknown command 'serve' (`help` lists them)"),
    ("completion bash", 2, "ublkshell: unknown command 'completion' (`help` lists them)"),
    ("stats 12345", 1, "ublkshell: device 12345 has no statistics (not served by ublkshell?)"),
])
def test_c_errors_are_one_line(server, env, dev7, line, code, message):
    p = shell_c(server, env, line)
    assert p.returncode == code, (p.returncode, p.stderr)
    assert p.stderr.strip() == message and p.stdout == ""


def test_c_without_a_server_says_so(tmp_path, env):
    p = shell_c(str(tmp_path / "none.sock"), env, "list")
    assert p.returncode == 1
    assert p.stderr.strip() == f"ublkshell: no ublkshell server at {tmp_path / 'none.sock'} " \
                               "(start one with `ublkshell serve`)"


def test_help_mentions_the_shell(env):
    p = subprocess.run([sys.executable, "-m", "ublkshell", "--help"], capture_output=True, text=True,
                       timeout=60, env=env)
    assert p.returncode == 0 and "-c COMMAND" in p.stdout and "interactive shell" in p.stdout


# -- pure parts ----------------------------------------------------------------
def _op(n, b, lat_ns=20_000, extra=()):
    """An op of a `stats --histograms` result: n IOs of lat_ns each, plus extra latencies."""
    lats = [lat_ns] * n + list(extra)
    hist = [0] * lib.US_HIST_BUCKETS
    for v in lats:
        hist[lib.us_hist_bucket(v)] += 1
    return {"ios": len(lats), "bytes": b, "errors": 0, "lat_sum_ns": sum(lats),
            "max_ns": max(lats, default=0), "buckets": buckets(hist)}


def _stats(dev, ios, nbytes, inflight=0, lat_ns=20_000):
    empty = {k: _op(0, 0) for k in ("read", "flush", "discard", "write_zeroes", "other")}
    per_q = [_op(n, b, lat_ns) for n, b in zip(ios, nbytes)]
    total = _op(sum(ios), sum(nbytes), lat_ns)
    return {"device": dev, "inflight": inflight, "ops": dict(empty, write=total),
            "queues": [{"queue": q, "inflight": inflight if q == 0 else 0, "ops": dict(empty, write=o)}
                       for q, o in enumerate(per_q)]}


def test_top_rates_are_differences_over_the_interval():
    old, new = _stats(3, [100, 0], [100 << 12, 0]), _stats(3, [300, 100], [300 << 12, 100 << 12], inflight=4)
    rows = views.device_rows(old, new, 2.0)
    assert [(r["label"], r["op"]) for r in rows] == [("all", "write"), ("q0", "write"), ("q1", "write")]
    assert [r["iops"] for r in rows] == [150.0, 100.0, 50.0]
    assert rows[0]["mibps"] == pytest.approx(300 * 4096 / 2 / (1 << 20))
    assert rows[0]["inflight"] == 4 and rows[0]["avg_ns"] == 20_000
    text = views.render_top([("3", old, new, None), ("4", None, None, "device 4 has no statistics")], 2.0, 1.0)
    assert "3      all write" in text and "device 4 has no statistics" in text
    assert re.search(r"^3\s+q1\s+write\s+50\.0\s+0\.20\s+20us\s+20us\s+20us\s+20us\s+0$", text, re.M), text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_top_latency_is_of_the_interval_not_since_the_start():
    # a slow past (1000 IOs at 5 ms) must not show in an interval of 10 fast IOs (10 us)
    old = {"device": 1, "inflight": 0, "queues": [], "ops": {"write": _op(1000, 1000 << 12, 5_000_000)}}
    new = {"device": 1, "inflight": 0, "queues": [],
           "ops": {"write": _op(1000, 1010 << 12, 5_000_000, extra=[10_000] * 10)}}
    (row,) = views.device_rows(old, new, 1.0)
    assert row["iops"] == 10 and row["avg_ns"] == 10_000
    assert all(9_000 < row[k] < 11_000 for k in ("p50_ns", "p99_ns", "p999_ns")), row


def test_top_shows_dashes_when_there_is_nothing_to_compare():
    new = _stats(3, [5, 0], [5 << 12, 0])
    assert all(r["iops"] is None for r in views.device_rows(None, new, 1.0))
    # counters that went back: the id belongs to a new device now
    assert all(r["iops"] is None for r in views.device_rows(_stats(3, [9, 9], [1, 1]), new, 1.0)[:1])
    idle = _stats(3, [0, 0], [0, 0])
    rows = views.device_rows(idle, idle, 1.0)
    assert [(r["label"], r["op"], r["iops"]) for r in rows] == [("all", "-", 0.0), ("q0", "-", 0.0), ("q1", "-", 0.0)]
    assert views.format_row("3", rows[0]).split()[-6:] == ["0.00", "-", "-", "-", "-", "0"]
    # one queue: its row would repeat the device's
    one = _stats(3, [5], [5 << 12])
    assert [r["label"] for r in views.device_rows(one, one, 1.0)] == ["all"]


def test_completion_candidates(monkeypatch):
    sh = Shell("/nonexistent.sock")
    monkeypatch.setattr(sh, "device_ids", lambda: [0, 7, 12])
    assert candidates(sh, [], "st") == ["stats"]
    assert candidates(sh, [], "in") == ["info", "inflight"]
    assert candidates(sh, ["add", "-t"], "") == ["null", "mem", "loop", "pattern"]
    assert candidates(sh, ["add", "--type"], "m") == ["mem"]
    # option values the command table offers, as bash and zsh complete them
    assert candidates(sh, ["add", "--io-mode"], "") == ["auto", "batch", "per-tag"]
    assert candidates(sh, ["add", "--zero-copy"], "of") == ["off"]
    assert candidates(sh, ["trace", "7", "--format"], "b") == ["blkparse"]
    assert candidates(sh, ["add", "--size"], "") == []
    assert "--depth" in candidates(sh, ["add"], "--d") and "--json" in candidates(sh, ["stats", "7"], "-")
    assert candidates(sh, ["stats"], "") == ["0", "7", "12"]
    assert candidates(sh, ["stats"], "1") == ["12"]
    assert candidates(sh, ["stats", "7"], "") == []
    assert candidates(sh, ["del", "7"], "") == ["0", "12"]
    assert candidates(sh, ["lat", "7"], "w") == ["write", "write_zeroes"]
    assert candidates(sh, ["trace", "7"], "") == ["q=", "tag=", "op=", "lba=", "min_lat=", "errors", "faulted"]
    assert candidates(sh, ["trace", "7", "--count", "3"], "op=f") == ["op=flush"]
    assert candidates(sh, ["add", "-q"], "") == []  # a number nobody can guess
    assert candidates(sh, ["help"], "tr") == ["trace"]
    assert candidates(sh, ["frob"], "") == []
    # fault verbs: ids, then the rule's words and values
    assert candidates(sh, ["del", "7"], "") == ["0", "12"]
    assert candidates(sh, ["delay"], "") == ["0", "7", "12"]
    assert candidates(sh, ["fail", "0"], "e") == ["errno="]
    assert candidates(sh, ["fail", "0"], "errno=ENO") == ["errno=ENOSPC", "errno=ENODATA"]
    assert candidates(sh, ["drop", "0"], "op=write,f") == ["op=write,flush"]
    assert candidates(sh, ["flakey", "0"], "mode=") == ["mode=error", "mode=drop"]
    assert "tag" in candidates(sh, ["hang", "0"], "") and "byte=" not in candidates(sh, ["hang", "0"], "")
    assert candidates(sh, ["corrupt", "0"], "b") == ["byte="]
    assert candidates(sh, ["badblocks", "0"], "") == ["errno=", "q="]
    assert candidates(sh, [], "fa") == ["fail", "faults"]


def test_device_ids_tolerate_a_missing_server():
    assert Shell("/nonexistent.sock").device_ids() == []
