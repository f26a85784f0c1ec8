"""`stats ID --interval`: iostat's columns from the kernel's block stat, beside the daemon's
service time. The arithmetic against iostat's definitions, then a real FUSE device behind a
real loop device."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from ublkshell.observe.iostat import COLUMNS, render_row, row


def sample(t, sys_stat, r_ios=0, r_lat=0, w_ios=0, w_lat=0):
    return {"t": t, "sys": sys_stat, "ours": {"read": {"ios": r_ios, "lat_sum_ns": r_lat},
                                              "write": {"ios": w_ios, "lat_sum_ns": w_lat}}}


def stat(reads=0, rsec=0, rticks=0, writes=0, wsec=0, wticks=0, io_ticks=0, in_queue=0):
    return {"reads": reads, "read_merges": 0, "read_sectors": rsec, "read_ticks": rticks, "writes": writes,
            "write_merges": 0, "write_sectors": wsec, "write_ticks": wticks, "in_flight": 0,
            "io_ticks": io_ticks, "time_in_queue": in_queue}


def test_columns_are_iostats():
    a = sample(10.0, stat(reads=100, rsec=800, rticks=50, writes=10, wsec=80, wticks=5, io_ticks=100, in_queue=300),
               r_ios=100, r_lat=10_000_000, w_ios=10, w_lat=1_000_000)
    # 2 s later: 2000 reads of 4 KiB that took 3000 ms in all, 500 writes of 8 KiB taking 1000 ms,
    # busy 1500 ms of 2000, 6000 ms of weighted time; the daemon served the reads in 0.25 ms each
    b = sample(12.0, stat(reads=2100, rsec=800 + 16000, rticks=3050, writes=510, wsec=80 + 8000, wticks=1005,
                          io_ticks=1600, in_queue=6300),
               r_ios=2100, r_lat=10_000_000 + 2000 * 250_000, w_ios=510, w_lat=1_000_000)
    r = row(a, b)
    assert r["r/s"] == 1000 and r["w/s"] == 250
    assert r["rMiB/s"] == pytest.approx(16000 * 512 / 2 / 2**20) and r["wMiB/s"] == pytest.approx(8000 * 512 / 2 / 2**20)
    assert r["r_await"] == 1.5 and r["w_await"] == 2.0  # ms per IO
    assert r["aqu-sz"] == 3.0 and r["%util"] == 75.0
    assert r["r_svc"] == 0.25 and r["w_svc"] == 0.0  # no write reached the daemon in the interval
    line = render_row("ublkb0", r)
    assert line.split() == ["ublkb0", "1000.00", "250.00", "3.91", "1.95", "1.500", "2.000", "3.00", "75.00",
                            "0.250", "0.000"]


def test_without_a_block_device_the_kernel_columns_are_unknown():
    r = row(sample(0.0, None, r_ios=0), sample(1.0, None, r_ios=10, r_lat=10 * 3000))
    assert [r[c] for c in COLUMNS[:8]] == [None] * 8 and r["r_svc"] == 0.003
    assert render_row("fuse0", r).split()[1:9] == ["-"] * 8


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("fio")
                    or not shutil.which("losetup"), reason="needs root, /dev/fuse, losetup and fio")
def test_rows_follow_fio_on_a_loop_device(tmp_path):
    mem = tmp_path / "mem"
    mem.mkdir(mode=0o700)
    env = dict(os.environ, UBLKSHELL_STATE_DIR=str(tmp_path / "state"), UBLKSHELL_DATA_DIR=str(mem))

    def u(*args, check=True):
        p = subprocess.run([sys.executable, "-m", "ublkshell", *args], capture_output=True, text=True,
                           timeout=120, env=env, cwd="/")
        assert not check or p.returncode == 0, p.stderr
        return p

    dev = json.loads(u("add", "--transport", "fuse", "-t", "mem", "--size", "64M", "--loop", "--json").stdout)
    try:
        fio = subprocess.Popen(["fio", "--name=r", f"--filename={dev['loop']}", "--rw=randread", "--bs=4k",
                                "--direct=1", "--ioengine=psync", "--time_based", "--runtime=20",
                                "--output-format=terse"], stdout=subprocess.DEVNULL)
        try:
            out = u("stats", dev["name"], "--interval", "500ms", "--count", "3", "--json").stdout
        finally:
            fio.kill()
            fio.wait()
        rows = [json.loads(line) for line in out.splitlines()]
        assert len(rows) == 3 and all(r["block"] == os.path.basename(dev["loop"]) for r in rows)
        busy = rows[-1]
        # reads only, one at a time: the queue holds about one IO and the daemon is part of each
        assert busy["r/s"] > 10 and busy["w/s"] == 0 and busy["rMiB/s"] == pytest.approx(busy["r/s"] * 4 / 1024)
        assert 0 < busy["r_svc"] and 0 < busy["r_await"] and busy["%util"] > 10
        text = u("stats", dev["name"], "--interval", "0.2", "--count", "2").stdout.splitlines()
        assert text[0].split()[:3] == ["Device", "r/s", "w/s"] and len(text) == 3
        for args, words in ((["--interval", "0"], "--interval: 0 is out of range"),
                            (["--interval", "soon"], "--interval"),
                            (["--interval", "1", "--queues"], "--queues is for one-shot stats"),
                            (["--interval", "1", "--count", "-2"], "--count")):
            p = u("stats", dev["name"], *args, check=False)
            assert p.returncode == 2 and words in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
    finally:
        u("del", "-a", check=False)
