"""`top` and `info` as command-line verbs on a real FUSE device behind a real loop device
under fio, the shell's banner and history file, and colour that honours NO_COLOR."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pexpect
import pytest

from ublkshell.repl.shell import banner, history_path

ESC = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
needs_fuse = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("fio")
                                or not shutil.which("losetup"), reason="needs root, /dev/fuse, losetup and fio")


@pytest.fixture
def env(tmp_path):
    mem = tmp_path / "mem"
    mem.mkdir(mode=0o700)
    return dict(os.environ, UBLKSHELL_STATE_DIR=str(tmp_path / "state"), UBLKSHELL_DATA_DIR=str(mem),
                HOME=str(tmp_path), TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")


def u(env, *args, check=True):
    p = subprocess.run([sys.executable, "-m", "ublkshell", *args], capture_output=True, text=True,
                       timeout=120, env=env, cwd="/")
    assert not check or p.returncode == 0, p.stderr
    return p


@pytest.fixture
def busy(env):
    """A FUSE mem device on a loop device with fio reading and writing it."""
    dev = json.loads(u(env, "add", "--transport", "fuse", "-t", "mem", "--size", "64M", "--loop",
                       "-n", "61", "--json").stdout)
    fio = subprocess.Popen(["fio", "--name=rw", f"--filename={dev['loop']}", "--rw=randrw", "--bs=4k",
                            "--direct=1", "--ioengine=psync", "--time_based", "--runtime=60"],
                           stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while json.loads(u(env, "stats", dev["name"], "--json").stdout)["ops"]["read"]["ios"] < 100:
            assert time.monotonic() < deadline and fio.poll() is None, "fio did not start"
            time.sleep(0.2)
        yield dev
    finally:
        fio.kill()
        fio.wait()
        u(env, "del", dev["name"], check=False)


@needs_fuse
def test_top_count_prints_frames_of_the_interval_in_80_columns(env, busy):
    out = u(env, "top", busy["name"], "--count", "2", "--interval", "500ms").stdout
    frames = [f for f in out.split("\n\n") if f.strip()]
    assert len(frames) == 2 and max(len(line) for line in out.splitlines()) <= 80
    for frame in frames:
        lines = frame.splitlines()
        assert lines[2].split() == ["DEV", "Q", "OP", "IOPS", "MiB/s", "AVG", "P50", "P99", "P99.9", "INFL"]
        rows = {line.split()[2]: line.split() for line in lines[3:]}
        for op in ("read", "write"):
            name, q, _, iops, mibps, *lat, infl = rows[op]
            assert (name, q) == ("fuse61", "all") and float(iops) > 10
            assert float(mibps) == pytest.approx(float(iops) * 4 / 1024, rel=0.05, abs=0.01)
            assert all(re.fullmatch(r"[\d.]+(ns|us|ms|s)", v) for v in lat), lines
    # the default is every device
    assert "fuse61 all read" in u(env, "top", "--count", "1", "--interval", "0.2").stdout


@needs_fuse
def test_top_full_screen_leaves_on_q(env, busy):
    child = pexpect.spawn(sys.executable, ["-m", "ublkshell", "top", busy["name"], "--interval", "0.2"],
                          env=env, encoding="utf-8", dimensions=(24, 80), timeout=30, cwd="/")
    try:
        child.expect_exact("IOPS")
        child.expect_exact("fuse61")
        child.expect_exact("(q: quit)")
        child.send("q")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


@needs_fuse
def test_info_is_the_list_line_and_the_stats(env, busy):
    text = u(env, "info", busy["name"]).stdout
    assert re.search(rf"^fuse61\s+LIVE\s+64M\s+1 x 128\s+\d+\s+mem\s+{busy['loop']}", text, re.M), text
    assert re.search(r"^read\s+\d+", text, re.M) and "io_uring_enter" in text
    r = json.loads(u(env, "info", busy["name"], "--json").stdout)
    assert r["device"] == "fuse61" and r["list"]["loop"] == busy["loop"] and r["error"] is None
    assert r["stats"]["ops"]["read"]["ios"] > 0


@pytest.mark.parametrize("args,words", [
    (["top", "--interval", "0"], "--interval: 0 is out of range (10ms..24h)"),
    (["top", "--interval", "soon"], "--interval"),
    (["top", "--count", "-1"], "--count"),
    (["top", "fuse"], "fuse"),
    (["info"], "required"),
    (["info", "12345"], "12345"),
])
def test_bad_top_and_info_are_one_line(env, args, words):
    p = u(env, *args, check=False)
    assert p.returncode in (1, 2) and words in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
    assert "Traceback" not in p.stderr


def test_history_lives_under_xdg_state_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    (tmp_path / ".ublkshell_history").write_text("\n# old\n+stats 0\n")
    path = history_path()
    assert path == str(tmp_path / "state/ublkshell/history")
    # the old file moved, lines intact, and the directory is private
    assert "+stats 0" in open(path).read() and not (tmp_path / ".ublkshell_history").exists()
    assert os.stat(tmp_path / "state/ublkshell").st_mode & 0o777 == 0o700
    # a relative XDG_STATE_HOME is ignored, as the spec says
    monkeypatch.setenv("XDG_STATE_HOME", "rel")
    assert history_path() == str(tmp_path / ".local/state/ublkshell/history")


def test_banner_names_the_server_socket_and_tree(tmp_path, env):
    sock = str(tmp_path / "s.sock")
    p = subprocess.Popen([sys.executable, "-m", "ublkshell", "serve", "--socket", sock, "--no-fuse"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert p.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        child = pexpect.spawn(sys.executable, ["-m", "ublkshell", "--socket", sock], env=env,
                              encoding="utf-8", timeout=30)
        child.expect_exact("ublk>")
        text = ESC.sub("", child.before)
        assert re.search(rf"server pid {p.pid} \(running\) at {re.escape(sock)}, "
                         r"stats tree not mounted", text), text
        assert "`help` lists the verbs" in text
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        p.terminate()
        p.wait(timeout=20)
    # a server that went away between the start and the banner: still one line, no traceback
    assert banner(sock, False).startswith("ublkshell ") and "server pid ?" in banner(sock, False)


def test_errors_are_red_on_a_terminal_unless_no_color(env):
    def run(extra):
        child = pexpect.spawn(sys.executable, ["-m", "ublkshell", "stats", "12345"], env={**env, **extra},
                              encoding="utf-8", timeout=30, cwd="/")
        child.expect(pexpect.EOF)
        child.close()
        return child.before
    coloured, plain = run({}), run({"NO_COLOR": "1"})
    assert "\x1b[31mublkshell: device 12345" in coloured
    assert "\x1b[" not in plain and "ublkshell: device 12345" in plain
    # a pipe gets plain text
    assert "\x1b[" not in u(env, "stats", "12345", check=False).stderr
