"""Both IO modes (`add --io-mode batch|per-tag`) on the real driver: the same IO,
faults and recovery through each protocol, and the crossing counters that tell
them apart. (The rest of the VM suite runs in the default mode, auto, which is
batch on this kernel.)"""
import json
import threading
import time

import pytest

from .conftest import cli, pattern, pread_direct, pwrite_direct, run
from .test_consumers import fio_verify
from .test_faults import delayed_tag_never_stalls_the_others

KB = 1024
MODES = ["batch", "per-tag"]


def stats(dev):
    return json.loads(cli("stats", str(dev["id"]), "--json").stdout)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target,bs", [("mem", "4k"), ("loop", "128k")])
def test_verify_and_counters(devices, backing, mode, target, bs):
    extra = ("-q", "2", "--io-mode", mode)
    if target == "mem":
        dev = devices.add("-t", "mem", "--size", "64M", *extra)
    else:
        dev = devices.add("-t", "loop", "-f", backing.make("ext4", 64 << 20), *extra)
    assert dev["io_mode"] == mode
    listed = {d["id"]: d for d in json.loads(cli("list", "--json").stdout)}
    assert listed[dev["id"]]["io_mode"] == mode
    assert ("batch_io" in listed[dev["id"]]["flags"]) == (mode == "batch")
    # two jobs, each in its own half: the queues serve them at once
    p = fio_verify(dev["path"], bs, size="16M", extra=("--numjobs=2", "--offset_increment=32M",
                                                         "--group_reporting"))
    # terse v3, one group: field 5 is the error count
    assert p.stdout.strip().splitlines()[-1].split(";")[4] == "0", p.stdout
    s = stats(dev)
    ios = sum(o["ios"] for o in s["ops"].values())
    ring = s["ring"]
    # every IO the records saw went back to the kernel, and nothing else did
    assert ring["committed"] == ios > 0, ring
    assert ring["enters"] > 0 and ring["cqes"] >= ring["fetches"] > 0, ring
    for q in s["queues"]:
        assert q["ring"]["committed"] == sum(o["ios"] for o in q["ops"].values()), q
    if mode == "per-tag":
        assert ring["commits"] == ring["committed"], ring
    else:
        # at depth 32 a turn's results go back together
        assert ring["commits"] < ring["committed"], ring
    text = cli("stats", str(dev["id"])).stdout
    assert "io_uring_enter" in text and "IOs per commit" in text, text


@pytest.mark.parametrize("mode", MODES)
def test_delayed_tag_never_stalls_the_others(devices, mode):
    delayed_tag_never_stalls_the_others(devices.add("-t", "mem", "--size", "16M", "--io-mode", mode))


@pytest.mark.parametrize("mode", MODES)
def test_fail_and_hang_then_del(devices, mode):
    dev = devices.add("-t", "mem", "--size", "16M", "--io-mode", mode)
    cli("fail", str(dev["id"]), "lba", "64..71", "op=write")
    with pytest.raises(OSError):
        pwrite_direct(dev["path"], pattern(4 * KB, 1), 64 * 512)
    pwrite_direct(dev["path"], pattern(4 * KB, 2), 0)
    assert pread_direct(dev["path"], 4 * KB, 0) == pattern(4 * KB, 2)
    cli("hang", str(dev["id"]), "lba", "128..135", "op=read")
    got = {}

    def withheld():
        try:
            pread_direct(dev["path"], 4 * KB, 128 * 512)
            got["read"] = "data"
        except OSError as e:
            got["read"] = e.errno

    th = threading.Thread(target=withheld, daemon=True)
    th.start()
    time.sleep(1)
    assert th.is_alive()
    tags = json.loads(cli("inflight", str(dev["id"]), "--json").stdout)["tags"]
    assert any(t["sector"] == 128 for t in tags), tags
    # the other tags still serve
    assert pread_direct(dev["path"], 4 * KB, 0) == pattern(4 * KB, 2)
    # del lets the withheld IO go (its rules are dropped first) and leaves nothing behind
    cli("del", str(dev["id"]), timeout=60)
    th.join(10)
    assert not th.is_alive() and "read" in got, got


@pytest.mark.parametrize("mode", MODES)
def test_kill_and_recover_keep_the_mode(devices, mode):
    dev = devices.add("-t", "mem", "--size", "16M", "--recovery", "--io-mode", mode)
    pwrite_direct(dev["path"], pattern(64 * KB, 3), 0)
    for _ in range(3):
        cli("kill", str(dev["id"]))
        cli("recover", str(dev["id"]))
        assert pread_direct(dev["path"], 64 * KB, 0) == pattern(64 * KB, 3)
    listed = {d["id"]: d for d in json.loads(cli("list", "--json").stdout)}
    assert listed[dev["id"]]["io_mode"] == mode and listed[dev["id"]]["state"] == "LIVE"
    p = fio_verify(dev["path"], "4k", size="8M")
    assert p.stdout.strip().splitlines()[-1].split(";")[4] == "0", p.stdout


def test_coalesce_fewer_enters_per_io(devices):
    """--coalesce trades latency at depth for crossings: at qd 32 a busy queue serves
    several completions per io_uring_enter; at qd 1 it never waits."""
    plain = devices.add("-t", "null", "--size", "1G", "--io-mode", "batch")
    waits = devices.add("-t", "null", "--size", "1G", "--io-mode", "batch", "--coalesce", "1ms")
    per_io, qd1 = {}, {}
    for dev in (plain, waits):
        run(["fio", "--name=c", f"--filename={dev['path']}", "--rw=randread", "--bs=4k",
             "--ioengine=io_uring", "--direct=1", "--iodepth=32", "--number_ios=4000",
             "--output-format=terse"], timeout=300)
        r = stats(dev)["ring"]
        per_io[dev["id"]] = r["enters"] / r["committed"]
    assert per_io[waits["id"]] < 0.6 * per_io[plain["id"]], per_io
    # depth 1: the next IO cannot come before this one ends, so a turn waiting for it
    # would add the whole 1 ms to each IO: the median IO would take 1 ms longer (a median,
    # not the run's length, which a busy host stretches for one device and not the other)
    for dev in (plain, waits):
        out = run(["fio", "--name=q1", f"--filename={dev['path']}", "--rw=randread", "--bs=4k",
                   "--ioengine=psync", "--direct=1", "--number_ios=1000", "--output-format=json"],
                  timeout=300).stdout
        qd1[dev["id"]] = json.loads(out[out.index("{"):])["jobs"][0]["read"]["clat_ns"]["percentile"]["50.000000"]
    assert qd1[waits["id"]] < qd1[plain["id"]] + 500_000, qd1


def test_unknown_io_mode_is_one_line(devices):
    p = cli("add", "-t", "null", "--size", "1G", "--io-mode", "sideways", check=False)
    assert p.returncode != 0 and "batch, per-tag" in p.stderr and "Traceback" not in p.stderr
