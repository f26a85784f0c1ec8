"""Fault rules on real devices, each proven by what a real program sees."""
import errno
import json
import os
import re
import threading
import time

import pytest

from .conftest import cli, errno_of, pattern, pread_direct, pwrite_direct, run
from .test_consumers import fio_verify

KB = 1024


def _dev(devices, backing, target, *extra):
    if target == "mem":
        return devices.add("-t", "mem", "--size", "64M", *extra)
    # loop on ext4: the target's io_uring path (linked commits, short IO)
    return devices.add("-t", "loop", "-f", backing.make("ext4", 64 << 20), *extra)


def rule(dev, action, *words):
    p = cli(action, str(dev["id"]), *words, "--json")
    return json.loads(p.stdout)["added"][0]["id"]


def faults(dev):
    return json.loads(cli("faults", str(dev["id"]), "--json").stdout)


@pytest.mark.parametrize("target", ["mem", "loop"])
def test_fail_range_only_there(devices, backing, target):
    dev = _dev(devices, backing, target)
    p = dev["path"]
    rid = rule(dev, "fail", "lba", "2048..4095", "op=read")
    assert errno_of(pread_direct, p, 4 * KB, 2048 * 512) == errno.EIO
    assert errno_of(pread_direct, p, 4 * KB, 4088 * 512) == errno.EIO
    assert errno_of(pread_direct, p, 4 * KB, 4096 * 512) == 0
    assert errno_of(pread_direct, p, 4 * KB, 2040 * 512) == 0
    # writes to the range are not reads: they pass
    pwrite_direct(p, pattern(4 * KB, 1), 2048 * 512)
    # dd over the whole device stops with EIO right at the range
    d = run(["dd", f"if={p}", "of=/dev/null", "bs=512", "iflag=direct", "count=4096"], check=False)
    assert d.returncode != 0 and "Input/output error" in d.stderr
    assert re.search(r"^2048\+0 records in", d.stderr, re.M), d.stderr
    f = faults(dev)
    assert f["rules"][0]["id"] == rid and f["rules"][0]["hits"] >= 3
    # the trace names the rule that failed each IO
    tr = cli("trace", str(dev["id"]), "--from-start", "--json", "--count", "3", "errors", timeout=60)
    recs = [json.loads(l) for l in tr.stdout.splitlines()]
    assert recs and all(r["result"] == -errno.EIO and r["fault"] == f"fail#{rid}" for r in recs)
    cli("clear", str(dev["id"]))
    assert pread_direct(p, 4 * KB, 2048 * 512) == pattern(4 * KB, 1)


def test_fail_count_and_errno(devices, backing):
    dev = _dev(devices, backing, "mem")
    rule(dev, "fail", "op=read", "count=1", "errno=ENOSPC")
    # the block layer carries ENOSPC up as itself; once, then never again
    assert errno_of(pread_direct, dev["path"], 4 * KB, 0) == errno.ENOSPC
    assert errno_of(pread_direct, dev["path"], 4 * KB, 0) == 0
    (r,) = faults(dev)["rules"]
    assert r["hits"] == 1 and r["left"] == 0


REFUSED = (errno.EROFS, errno.EIO)


def test_ext4_goes_read_only_on_write_error(devices, backing, scratch):
    dev = _dev(devices, backing, "mem")
    mnt = os.path.join(scratch, "mnt")
    os.makedirs(mnt)
    run(["mkfs.ext4", "-q", "-F", dev["path"]])
    run(["mount", "-o", "errors=remount-ro", dev["path"], mnt])
    try:
        with open(os.path.join(mnt, "before"), "w") as f:
            f.write("x" * 10000)
        run(["sync"])
        rule(dev, "fail", "op=write")
        deadline = time.monotonic() + 60
        i = 0
        while time.monotonic() < deadline:
            # kernels differ in how they show ext4's forced read-only state: /proc/mounts says
            # `ro`, `emergency_ro` or nothing (6.12), and a new file fails with EROFS, or EIO
            # (6.12, its journal aborted); either way the filesystem takes no new file
            if errno_of(open, os.path.join(mnt, f"probe{i}"), "w") in REFUSED:
                break
            # a data write that fails only marks the file; the journal aborts when one of its
            # own writes fails, so give every round new metadata to commit
            try:
                with open(os.path.join(mnt, f"after{i}"), "w") as f:
                    f.write("y" * 100000)
                os.mkdir(os.path.join(mnt, f"dir{i}"))
            except OSError:
                pass
            i += 1
            run(["sync"], check=False)
            time.sleep(0.5)
        assert errno_of(open, os.path.join(mnt, "third"), "w") in REFUSED
        assert faults(dev)["rules"][0]["hits"] > 0
    finally:
        cli("clear", str(dev["id"]))
        run(["umount", mnt], check=False)


def test_delay_in_histogram_and_fio(devices, backing):
    dev = _dev(devices, backing, "mem")
    rule(dev, "delay", "5ms", "op=read")
    p = run(["fio", "--name=lat", f"--filename={dev['path']}", "--rw=randread", "--bs=4k", "--size=16M",
             "--ioengine=psync", "--direct=1", "--number_ios=100", "--output-format=json"], timeout=300)
    job = json.loads(p.stdout)["jobs"][0]["read"]
    assert job["total_ios"] == 100
    assert job["clat_ns"]["mean"] >= 5e6 and job["clat_ns"]["min"] >= 5e6, job["clat_ns"]
    lat = json.loads(cli("lat", str(dev["id"]), "read", "--json").stdout)
    assert lat["ios"] >= 100 and lat["p50_ns"] >= 5e6 * 0.97, lat
    # writes are not delayed
    t0 = time.monotonic()
    for i in range(20):
        pwrite_direct(dev["path"], pattern(4 * KB, i), i * 4 * KB)
    assert time.monotonic() - t0 < 20 * 5e-3 + 2, "writes were delayed too"


def test_delayed_tag_never_stalls_the_others(devices, backing):
    delayed_tag_never_stalls_the_others(_dev(devices, backing, "loop"))


def delayed_tag_never_stalls_the_others(dev):
    """A 2 s delay on sector 0 holds that read alone: 19 others finish meanwhile."""
    rule(dev, "delay", "2s", "lba", "0..7")
    done = {}

    def slow():
        t = time.monotonic()
        pread_direct(dev["path"], 4 * KB, 0)
        done["slow"] = time.monotonic() - t

    th = threading.Thread(target=slow)
    th.start()
    time.sleep(0.3)
    t = time.monotonic()
    for i in range(1, 20):
        pread_direct(dev["path"], 4 * KB, i * 4 * KB)
    others = time.monotonic() - t
    assert "slow" not in done, "the delayed read finished early"
    th.join(10)
    assert others < 1.5 and 2.0 <= done["slow"] < 6, (others, done)


@pytest.mark.parametrize("target", ["mem", "loop"])
def test_dropped_writes_read_back_old(devices, backing, target):
    dev = _dev(devices, backing, target)
    old, new = pattern(64 * KB, 1), pattern(64 * KB, 2)
    pwrite_direct(dev["path"], old, 1 << 20)
    rule(dev, "drop", "op=write")
    pwrite_direct(dev["path"], new, 1 << 20)  # acknowledged
    cli("clear", str(dev["id"]))
    assert pread_direct(dev["path"], 64 * KB, 1 << 20) == old


@pytest.mark.parametrize("target", ["mem", "loop"])
def test_corrupt_read_caught_by_fio_verify(devices, backing, target):
    dev = _dev(devices, backing, target)
    # fio writes everything first, then reads it back: the reads are corrupted
    rule(dev, "corrupt", "op=read", "count=1")
    p = run(["fio", "--name=verify", f"--filename={dev['path']}", "--rw=write", "--bs=64k", "--size=4M",
             "--ioengine=io_uring", "--direct=1", "--iodepth=8", "--verify=crc32c", "--do_verify=1",
             "--verify_fatal=1", "--verify_state_save=0"], check=False, timeout=300)
    assert p.returncode != 0 and "verify" in (p.stdout + p.stderr).lower(), p.stdout + p.stderr
    assert faults(dev)["rules"][0]["hits"] == 1
    # without the rule the same job verifies clean
    cli("clear", str(dev["id"]))
    fields = fio_verify(dev["path"], "64k", size="4M").stdout.strip().splitlines()[-1].split(";")
    assert fields[4] == "0"


@pytest.mark.parametrize("target", ["mem", "loop"])
def test_corrupt_write_flips_the_named_byte(devices, backing, target):
    dev = _dev(devices, backing, target)
    data = pattern(4 * KB, 3)
    rule(dev, "corrupt", "op=write", "lba", "100", "byte=17")
    pwrite_direct(dev["path"], data, 96 * 512)
    cli("clear", str(dev["id"]))
    got = pread_direct(dev["path"], 4 * KB, 96 * 512)
    diff = [i for i in range(len(data)) if got[i] != data[i]]
    assert diff == [4 * 512 + 17] and got[diff[0]] == data[diff[0]] ^ 0xFF


@pytest.mark.parametrize("target", ["mem", "loop"])
def test_torn_write_keeps_the_first_sectors(devices, backing, target):
    dev = _dev(devices, backing, target)
    old, new = pattern(4 * KB, 4), pattern(4 * KB, 5)
    pwrite_direct(dev["path"], old, 0)
    rule(dev, "torn", "sectors=2", "count=1")
    pwrite_direct(dev["path"], new, 0)  # reported whole
    got = pread_direct(dev["path"], 4 * KB, 0)
    assert got[:1024] == new[:1024] and got[1024:] == old[1024:]
    # count=1: the next write is whole
    pwrite_direct(dev["path"], new, 0)
    assert pread_direct(dev["path"], 4 * KB, 0) == new


def test_hang_ages_in_inflight_until_cleared(devices, backing):
    dev = _dev(devices, backing, "mem")
    data = pattern(4 * KB, 6)
    pwrite_direct(dev["path"], data, 0)
    # the block layer's timeout would fire after 1 s: ublk re-arms it for a privileged device
    with open(f"/sys/block/ublkb{dev['id']}/queue/io_timeout", "w") as f:
        f.write("1000")
    rid = rule(dev, "hang", "lba", "0..7", "op=read")
    got = {}
    th = threading.Thread(target=lambda: got.setdefault("data", pread_direct(dev["path"], 4 * KB, 0)))
    th.start()
    time.sleep(3)
    assert th.is_alive()
    tags = json.loads(cli("inflight", str(dev["id"]), "--json").stdout)["tags"]
    (t,) = [t for t in tags if t["fault"]]
    assert t["fault"] == f"hang#{rid}" and t["age_ns"] >= 2.5e9 and t["sector"] == 0
    assert faults(dev)["hung"] == 1
    cli("clear", str(dev["id"]), str(rid))
    th.join(5)
    assert not th.is_alive() and got["data"] == data
    assert faults(dev)["hung"] == 0


def test_hang_released_by_del(devices, backing):
    dev = _dev(devices, backing, "mem")
    rule(dev, "hang", "op=read")
    res = {}

    def reader():
        try:
            pread_direct(dev["path"], 4 * KB, 0)
            res["rc"] = 0
        except OSError as e:
            res["rc"] = e.errno

    th = threading.Thread(target=reader)
    th.start()
    time.sleep(1)
    t = time.monotonic()
    cli("del", str(dev["id"]), timeout=60)
    th.join(10)
    assert not th.is_alive() and time.monotonic() - t < 15
    assert not os.path.exists(f"/dev/ublkc{dev['id']}")


def test_flakey_up_and_down(devices, backing):
    dev = _dev(devices, backing, "mem")
    rule(dev, "flakey", "up=400ms", "down=400ms", "mode=error")
    outcome = []
    t_end = time.monotonic() + 2.4
    while time.monotonic() < t_end:
        outcome.append(errno_of(pread_direct, dev["path"], 4 * KB, 0))
        time.sleep(0.02)
    assert set(outcome) == {0, errno.EIO}, outcome
    # intervals, not coin flips: few switches between the two
    switches = sum(1 for a, b in zip(outcome, outcome[1:]) if a != b)
    assert 2 <= switches <= 10, outcome


def test_flakey_drop_mode_keeps_reads(devices, backing):
    dev = _dev(devices, backing, "mem")
    old = pattern(4 * KB, 7)
    pwrite_direct(dev["path"], old, 0)
    rule(dev, "flakey", "up=1ms", "down=60s", "mode=drop")
    time.sleep(0.05)
    pwrite_direct(dev["path"], pattern(4 * KB, 8), 0)
    assert pread_direct(dev["path"], 4 * KB, 0) == old


@pytest.mark.parametrize("target", ["mem", "loop"])
def test_badblocks_until_rewritten(devices, backing, target):
    dev = _dev(devices, backing, target)
    rule(dev, "badblocks", "100..103")
    assert errno_of(pread_direct, dev["path"], 4 * KB, 96 * 512) == errno.EIO
    assert errno_of(pread_direct, dev["path"], 4 * KB, 104 * 512) == 0
    data = pattern(4 * KB, 9)
    pwrite_direct(dev["path"], data, 96 * 512)
    assert pread_direct(dev["path"], 4 * KB, 96 * 512) == data
    assert faults(dev)["rules"][0]["healed"] == 4


def test_badblocks_huge_range_is_one_rule_that_heals_exactly(devices, backing):
    """2^40 sectors listed bad: one rule, at once (it used to be one rule per 64
    sectors, built in Python), and exactly the rewritten sectors read again."""
    dev = _dev(devices, backing, "mem")
    p = dev["path"]
    last = (1 << 40) - 1
    t = time.monotonic()
    added = json.loads(cli("badblocks", str(dev["id"]), f"0..{last}", "--json").stdout)["added"]
    assert len(added) == 1 and added[0]["text"] == f"badblocks 0..{last}"
    assert time.monotonic() - t < 20  # a CLI start in the VM; millions of rules took minutes
    for off in (0, 32 << 20, (64 << 20) - 4 * KB):
        assert errno_of(pread_direct, p, 4 * KB, off) == errno.EIO
    a, b = pattern(8 * KB, 10), pattern(4 * KB, 11)
    pwrite_direct(p, a, 2048 * 512)                 # sectors 2048..2063
    pwrite_direct(p, b, 4096 * 512)                 # sectors 4096..4103
    assert pread_direct(p, 8 * KB, 2048 * 512) == a and pread_direct(p, 4 * KB, 4096 * 512) == b
    # one sector short of either side still fails
    assert errno_of(pread_direct, p, 4 * KB, 2044 * 512) == errno.EIO
    assert errno_of(pread_direct, p, 4 * KB, 2060 * 512) == errno.EIO
    assert errno_of(pread_direct, p, 8 * KB, 4096 * 512) == errno.EIO
    (r,) = faults(dev)["rules"]
    assert r["healed"] == 16 + 8 and r["heal_lost"] == 0 and r["hits"] >= 6
    assert "(24 rewritten)" in cli("faults", str(dev["id"])).stdout


def test_flush_passes_a_rule_with_an_lba_range(devices, backing):
    """fsync on the block device sends a FLUSH (the device has a volatile
    cache): `fail lba 0..7` must not fail it, `fail op=flush` must."""
    dev = _dev(devices, backing, "mem")
    rule(dev, "fail", "lba", "0..7")
    fd = os.open(dev["path"], os.O_RDWR)
    try:
        os.pwrite(fd, pattern(4 * KB, 12), 1 << 20)
        os.fsync(fd)
        assert errno_of(pread_direct, dev["path"], 4 * KB, 0) == errno.EIO
        rid = rule(dev, "fail", "op=flush")
        os.pwrite(fd, pattern(4 * KB, 13), 1 << 20)
        assert errno_of(os.fsync, fd) == errno.EIO
        assert [r["hits"] >= 1 for r in faults(dev)["rules"] if r["id"] == rid] == [True]
    finally:
        os.close(fd)


def test_probability_replays_with_seed(devices, backing):
    dev = _dev(devices, backing, "mem")
    rule(dev, "fail", "op=read", "p=0.5")

    def run_once():
        cli("seed", str(dev["id"]), "4242")
        return [errno_of(pread_direct, dev["path"], 4 * KB, i * 4 * KB) for i in range(60)]

    first = run_once()
    assert first.count(errno.EIO) in range(12, 49), first
    assert run_once() == first
