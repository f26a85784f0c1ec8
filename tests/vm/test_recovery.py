"""Daemon death and recovery on the real driver: `kill` runs the kernel's abort
path, `recover` hands the device to a new daemon. Each claim is checked by what
a real program sees: its IO fails, waits, or completes with the right data."""
import errno
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from .conftest import await_writes, cli, pattern, pread_direct, pwrite_direct

KB = 1024
MB = 1024 * KB

# one O_DIRECT read or write in a child: a wedged device fails a test, never hangs it
IO_CHILD = r"""
import hashlib, json, mmap, os, random, sys
op, path, off, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
buf = mmap.mmap(-1, n)
try:
    if op == "read":
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        os.preadv(fd, [buf], off)
    else:
        buf.write(random.Random(int(sys.argv[5])).randbytes(n))
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        os.pwritev(fd, [buf], off)
    print(json.dumps({"errno": 0, "sha": hashlib.sha256(bytes(buf)).hexdigest()}), flush=True)
except OSError as e:
    print(json.dumps({"errno": e.errno}), flush=True)
"""


class Io:
    """An IO in flight in a child process."""

    def __init__(self, op, path, off, n, seed=0):
        self.t0 = time.monotonic()
        self.p = subprocess.Popen([sys.executable, "-c", IO_CHILD, op, path, str(off), str(n), str(seed)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def running(self) -> bool:
        return self.p.poll() is None

    def result(self, timeout=60) -> dict:
        try:
            out, err = self.p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.communicate()
            raise AssertionError(f"the IO did not finish within {timeout} s") from None
        self.seconds = time.monotonic() - self.t0
        assert self.p.returncode == 0, err
        return json.loads(out)

    def close(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.communicate()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def jcli(*args, timeout=180) -> dict:
    return json.loads(cli(*args, "--json", timeout=timeout).stdout)


def listed(dev_id) -> dict:
    (d,) = [d for d in jcli("list") if d["id"] == dev_id]
    return d


def hold_read(dev, off=0, n=4 * KB) -> Io:
    """A read the daemon has taken and withholds (a hang rule used up by it)."""
    cli("hang", str(dev["id"]), "op=read", "count=1")
    io = Io("read", dev["path"], off, n)
    deadline = time.monotonic() + 30
    while not jcli("faults", str(dev["id"]))["hung"]:
        assert io.running(), io.result()
        assert time.monotonic() < deadline, "the read never reached the daemon"
        time.sleep(0.2)
    return io


def test_kill_without_recovery_fails_io_and_del_cleans_up(devices):
    dev = devices.add("-t", "mem", "--size", "32M")
    data = pattern(64 * KB, 1)
    pwrite_direct(dev["path"], data, 0)
    held = hold_read(dev)
    fd = os.open(dev["path"], os.O_RDWR | os.O_DIRECT)  # opened before: the node goes away
    try:
        t0 = time.monotonic()
        k = jcli("kill", str(dev["id"]))
        assert (k["daemon_gone"], k["state"], k["recovery"]) == (True, "DEAD", None), k
        r = held.result(timeout=30)
        assert r["errno"] == errno.EIO, r
        assert held.seconds < 10, f"the held read took {held.seconds:.1f} s to fail"
        # the kernel stopped the disk: its node is gone, an fd still open sees no capacity
        assert not os.path.exists(dev["path"])
        import mmap

        buf = mmap.mmap(-1, 4 * KB)
        assert os.preadv(fd, [buf], 8 * KB) == 0
        with pytest.raises(OSError) as e:
            os.pwritev(fd, [buf], 8 * KB)
        assert e.value.errno == errno.ENOSPC
        assert time.monotonic() - t0 < 15
    finally:
        os.close(fd)
    d = listed(dev["id"])
    assert (d["state"], d["daemon_alive"]) == ("DEAD", False)
    assert "IO fails until the device is deleted" in cli("list").stdout
    p = cli("recover", str(dev["id"]), check=False)
    assert p.returncode == 1 and p.stderr.strip() == (
        f"ublkshell: device {dev['id']} was added without --recovery: it cannot be recovered "
        f"(delete it: `del {dev['id']}`)")
    cli("del", str(dev["id"]), timeout=60)
    assert not os.path.exists(f"/dev/ublkc{dev['id']}")
    assert not os.path.exists(f"/run/ublkshell/devices/{dev['id']}.json")


@pytest.mark.parametrize("target", ["mem", "loop"])
def test_io_waits_while_dead_and_completes_after_recover(devices, scratch, target):
    if target == "mem":
        dev = devices.add("-t", "mem", "--size", "32M", "-q", "2", "--recovery")
    else:
        img = os.path.join(scratch, "disk.img")
        with open(img, "wb") as f:
            f.truncate(32 * MB)
        dev = devices.add("-t", "loop", "-f", img, "-q", "2", "--recovery")
    assert dev["recovery"] == "requeue"
    before = pattern(256 * KB, 2)
    pwrite_direct(dev["path"], before, 0)
    stats_ino = os.stat(dev["stats"]).st_ino
    writes = jcli("stats", str(dev["id"]))["ops"]["write"]["ios"]

    k = jcli("kill", str(dev["id"]))
    assert (k["state"], k["recovery"]) == ("QUIESCED", "requeue"), k
    d = listed(dev["id"])
    assert (d["state"], d["daemon_alive"]) == ("QUIESCED", False)
    assert f"`recover {dev['id']}`" in cli("list").stdout
    reader = Io("read", dev["path"], 0, 256 * KB)
    writer = Io("write", dev["path"], 1 * MB, 64 * KB, seed=3)
    try:
        time.sleep(3)
        assert reader.running() and writer.running(), "IO must wait while no daemon serves"
        t0 = time.monotonic()
        rec = jcli("recover", str(dev["id"]))
        assert rec["pid"] != dev["pid"] and rec["old_pid"] == dev["pid"] and rec["recoveries"] == 1
        r, w = reader.result(30), writer.result(30)
        assert time.monotonic() - t0 < 30
    finally:
        reader.close()
        writer.close()
    assert r == {"errno": 0, "sha": sha(before)}, "data written before the kill must read back"
    assert w["errno"] == 0
    assert pread_direct(dev["path"], 64 * KB, 1 * MB) == pattern(64 * KB, 3)
    d = listed(dev["id"])
    assert (d["state"], d["daemon_alive"], d["pid"]) == ("LIVE", True, rec["pid"])
    # the same statistics file: the counters go on from where the dead daemon left them
    assert os.stat(dev["stats"]).st_ino == stats_ino
    assert jcli("stats", str(dev["id"]))["ops"]["write"]["ios"] >= writes + 1
    # and the recovered device deletes like any other
    cli("del", str(dev["id"]), timeout=60)
    assert not os.path.exists(f"/dev/ublkc{dev['id']}")
    if target == "mem":
        assert not os.path.exists(rec["mem_path"]), "mem data left behind"


@pytest.mark.parametrize("mode,state,held_errno", [("requeue", "QUIESCED", errno.EIO),
                                                    ("reissue", "QUIESCED", 0),
                                                    ("fail", "FAIL_IO", errno.EIO)])
def test_io_the_dead_daemon_held(devices, mode, state, held_errno):
    """requeue and fail fail what the daemon had taken; reissue hands it to the next daemon."""
    dev = devices.add("-t", "mem", "--size", "32M", f"--recovery={mode}")
    data = pattern(16 * KB, 4)
    pwrite_direct(dev["path"], data, 0)
    held = hold_read(dev, 0, 16 * KB)
    try:
        k = jcli("kill", str(dev["id"]))
        assert (k["state"], k["recovery"]) == (state, mode), k
        if held_errno:
            # failed at once, before any new daemon exists
            assert held.result(30)["errno"] == held_errno
        else:
            time.sleep(2)
            assert held.running(), "a held IO must wait for the next daemon"
        rec = jcli("recover", str(dev["id"]))
        assert rec["abandoned"] == 1, rec  # the tag the hang rule withheld
        r = held.result(30)
    finally:
        held.close()
    assert r["errno"] == held_errno
    if not held_errno:
        assert r["sha"] == sha(data)
    assert pread_direct(dev["path"], 16 * KB, 0) == data
    f = jcli("faults", str(dev["id"]))
    assert f["hung"] == 0 and f["rules"][0]["hits"] == 1, f  # used up: the reissue was served


def test_fail_mode_fails_io_while_dead(devices):
    dev = devices.add("-t", "mem", "--size", "32M", "--recovery=fail")
    data = pattern(32 * KB, 5)
    pwrite_direct(dev["path"], data, 0)
    k = jcli("kill", str(dev["id"]))
    assert (k["state"], k["recovery"]) == ("FAIL_IO", "fail"), k
    assert "IO fails (EREMOTEIO) until" in cli("list").stdout
    for io in (Io("read", dev["path"], 0, 4 * KB), Io("write", dev["path"], 64 * KB, 4 * KB, seed=6)):
        r = io.result(30)
        # new IO meets the driver's "no server" check: BLK_STS_TARGET, not EIO
        assert r["errno"] == errno.EREMOTEIO, r
        assert io.seconds < 10
    rec = jcli("recover", str(dev["id"]))
    assert rec["recovery"] == "fail"
    assert pread_direct(dev["path"], 32 * KB, 0) == data
    new = pattern(4 * KB, 7)
    pwrite_direct(dev["path"], new, 64 * KB)
    assert pread_direct(dev["path"], 4 * KB, 64 * KB) == new


def test_del_of_a_waiting_device_fails_its_io(devices):
    dev = devices.add("-t", "mem", "--size", "32M", "--recovery")
    jcli("kill", str(dev["id"]))
    io = Io("read", dev["path"], 0, 4 * KB)
    try:
        time.sleep(2)
        assert io.running()
        t0 = time.monotonic()
        cli("del", str(dev["id"]), timeout=60)
        assert io.result(30)["errno"] == errno.EIO
        assert time.monotonic() - t0 < 30
    finally:
        io.close()
    assert not os.path.exists(f"/dev/ublkc{dev['id']}")
    assert dev["mem_path"] and not os.path.exists(dev["mem_path"])


def test_a_pid_reused_after_the_daemon_died_is_never_signalled(devices):
    """The registry names the dead daemon's pid; another process has it now:
    kill, powercut and del act on the device and leave that process alone."""
    from ublkshell import procs
    from ublkshell.devices import registry

    dev = devices.add("-t", "mem", "--size", "16M", "--recovery", "--powercut")
    jcli("kill", str(dev["id"]))
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        entry = registry.read(dev["id"])
        registry.write(dev["id"], dict(entry, pid=bystander.pid, pid_start=procs.start_time(bystander.pid)))
        for verb, words in (("kill", "has no live daemon"), ("powercut", "is not running")):
            p = cli(verb, str(dev["id"]), check=False)
            assert p.returncode == 1 and words in p.stderr, p.stderr
        cli("del", str(dev["id"]), timeout=60)
        assert not os.path.exists(f"/dev/ublkc{dev['id']}")
        assert bystander.poll() is None, "a process that reused a daemon's pid was signalled"
    finally:
        bystander.kill()
        bystander.wait()


def test_kill_and_recover_errors_are_one_line(devices):
    for verb in ("kill", "recover"):
        p = cli(verb, "4000", check=False)
        assert (p.returncode, p.stderr.strip()) == (1, "ublkshell: device 4000 does not exist"), p.stderr
    dev = devices.add("-t", "null", "--size", "16M", "--recovery")
    i = dev["id"]
    p = cli("recover", str(i), check=False)
    assert (p.returncode, p.stderr.strip()) == (
        1, f"ublkshell: device {i} is served by a live daemon (pid {dev['pid']}): "
           f"nothing to recover (`kill {i}` first)"), p.stderr
    jcli("kill", str(i))
    p = cli("kill", str(i), check=False)
    assert (p.returncode, p.stderr.strip()) == (
        1, f"ublkshell: device {i} has no live daemon (QUIESCED): nothing to kill"), p.stderr
    jcli("recover", str(i))
    p = cli("recover", str(i), check=False)
    assert p.returncode == 1 and "is served by a live daemon" in p.stderr and len(p.stderr.splitlines()) == 1


def test_failed_recovery_leaves_the_device_waiting(devices):
    dev = devices.add("-t", "mem", "--size", "16M", "--recovery")
    i, mem = dev["id"], dev["mem_path"]
    data = pattern(8 * KB, 11)
    pwrite_direct(dev["path"], data, 0)
    jcli("kill", str(i))
    os.rename(mem, mem + ".away")
    try:
        p = cli("recover", str(i), check=False)
    finally:
        os.rename(mem + ".away", mem)
    assert (p.returncode, p.stderr.strip()) == (
        1, f"ublkshell: the mem data of device {i} ({mem}) is gone: cannot recover it"), p.stderr
    assert listed(i)["state"] == "QUIESCED"
    jcli("recover", str(i))
    assert pread_direct(dev["path"], 8 * KB, 0) == data


def test_recover_after_powercut_serves_the_post_crash_data(devices):
    dev = devices.add("-t", "mem", "--size", "32M", "--recovery", "--powercut")
    durable, lost = pattern(16 * KB, 8), pattern(16 * KB, 9)
    fd = os.open(dev["path"], os.O_RDWR | os.O_DIRECT)
    try:
        import mmap

        buf = mmap.mmap(-1, 16 * KB)
        buf.write(durable)
        os.pwritev(fd, [buf], 0)
        os.fsync(fd)
        buf.seek(0)
        buf.write(lost)
        os.pwritev(fd, [buf], 0)
    finally:
        os.close(fd)
    r = jcli("powercut", str(dev["id"]))
    assert r["dropped"] == 1 and r["recovery"]
    rec = jcli("recover", str(dev["id"]))
    assert rec["pid"] != dev["pid"]
    assert pread_direct(dev["path"], 16 * KB, 0) == durable


# 8 cycles by default keep the CI run short; UBLKSHELL_RECOVERY_CYCLES=N soaks (20, 200...)
FIO_CYCLES = int(os.environ.get("UBLKSHELL_RECOVERY_CYCLES", "8"))
WRITES_PER_CYCLE = 300
# fio must still be writing when the last cycle's kill comes. A cycle takes more writes than the
# 300 it waits for (fio writes in bursts of its verify backlog, and goes on writing while
# `recover` returns): up to ~880 in CI runs, where fio ran out after 5, 6 and 7 of 8 cycles when
# given less. 1280 writes a cycle, in passes over an 8 MiB region (2048 writes), leave ~45% spare.
FIO_REGION = 8 << 20
FIO_PER_LOOP = FIO_REGION // 4096
FIO_LOOPS = -(-FIO_CYCLES * 1280 // FIO_PER_LOOP)


@pytest.mark.parametrize("mode", ["reissue", "requeue"])
def test_kill_and_recover_repeatedly_under_fio_verify(devices, mode):
    """fio keeps writing and verifying while its device's daemon is killed and
    replaced FIO_CYCLES times: every write it had acknowledged reads back intact."""
    from ublkshell.devices.recovery import kill, recover

    dev = devices.add("-t", "mem", "--size", "16M", f"--recovery={mode}")
    argv = ["fio", "--name=verify", f"--filename={dev['path']}", "--rw=randwrite", "--bs=4k",
            f"--size={FIO_REGION}", f"--loops={FIO_LOOPS}", "--ioengine=io_uring", "--direct=1", "--iodepth=16",
            "--verify=crc32c", "--do_verify=1", "--verify_backlog=256", "--serialize_overlap=1",
            "--verify_state_save=0",
            "--output-format=json"]
    if mode == "requeue":
        # the writes the dead daemon had taken fail (EIO) and were never acknowledged
        argv.append("--continue_on_error=io")
    fio = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    took = []
    try:
        for cycle in range(FIO_CYCLES):
            await_writes(dev["id"], WRITES_PER_CYCLE, fio, f"{cycle} cycles")
            t0 = time.monotonic()
            k = kill(dev["id"])
            assert k["state"] == "QUIESCED", k
            recover(dev["id"])
            took.append(time.monotonic() - t0)
        out, err = fio.communicate(timeout=600)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.communicate()
    job = json.loads(out[out.index("{"):])["jobs"][0]
    # a verify error is never "continued": fio would end with error 84 (EILSEQ) and say "verify"
    assert fio.returncode == 0 and "verify" not in err, err
    if mode == "reissue":
        assert job["error"] == 0
        assert job["write"]["total_ios"] == FIO_LOOPS * FIO_PER_LOOP
        assert job["read"]["total_ios"] == FIO_LOOPS * FIO_PER_LOOP  # every write verified
    else:
        # only EIO, and only on the few IOs a dead daemon held (counted with continue_on_error)
        assert job["error"] in (0, errno.EIO) and job["first_error"] in (0, errno.EIO), job
        assert job["total_err"] <= FIO_CYCLES * 16, job
        assert job["read"]["total_ios"] > 0
    print(f"{mode}: {FIO_CYCLES} kill+recover cycles, {sum(took) / len(took):.2f} s each on average; "
          f"fio wrote {job['write']['total_ios']}, verified {job['read']['total_ios']}, "
          f"IO errors {job.get('total_err', 0)}")


@pytest.fixture
def auto_server(scratch):
    sock = os.path.join(scratch, "s.sock")
    mnt = os.path.join(scratch, "stats")
    p = subprocess.Popen([sys.executable, "-m", "ublkshell", "serve", "--socket", sock, "--mount", mnt,
                          "--auto-recover"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (os.path.exists(sock) and os.path.ismount(mnt)):
        assert p.poll() is None, p.stdout.read()
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.1)
    yield sock, mnt
    if p.poll() is None:
        p.terminate()
        p.wait(timeout=60)
    assert not os.path.ismount(mnt), "the stats tree is still mounted"
    # a stopped server leaves the devices to their daemons: the test deletes what it made
    cli("del", "-a", timeout=120)
    assert not [n for n in os.listdir("/dev") if n.startswith("ublkc")], "devices left behind"


def wait_event(sock, kind, dev_id, timeout=60) -> dict:
    from ublkshell.bridge.client import Client

    deadline = time.monotonic() + timeout
    while True:
        with Client(sock) as c:
            events = c.call("events", last=200)
        hits = [e for e in events if e["kind"] == kind and e.get("id") == dev_id]
        if hits:
            return hits[-1]
        assert time.monotonic() < deadline, f"no {kind} event for dev {dev_id}: {events}"
        time.sleep(0.3)


def test_server_reports_kills_and_auto_recovers(auto_server):
    from .test_server_tree import shell

    sock, mnt = auto_server
    dev = json.loads(shell(sock, "add -t mem --size 32M --recovery --json"))
    plain = json.loads(shell(sock, "add -t mem --size 16M --json"))
    i = dev["id"]
    data = pattern(64 * KB, 10)
    pwrite_direct(f"/dev/ublkb{i}", data, 0)
    info = os.path.join(mnt, f"ublkb{i}", "info.json")
    deadline = time.monotonic() + 10
    while not os.path.exists(info):
        assert time.monotonic() < deadline
        time.sleep(0.1)

    assert f"daemon {dev['pid']} killed; device QUIESCED" in shell(sock, f"kill {i}")
    killed = wait_event(sock, "daemon-killed", i)
    assert (killed["pid"], killed["state"], killed["recovery"]) == (dev["pid"], "QUIESCED", "requeue")
    rec = wait_event(sock, "auto-recovered", i)
    assert rec["old_pid"] == dev["pid"] and rec["pid"] != dev["pid"] and rec["recoveries"] == 1
    assert pread_direct(f"/dev/ublkb{i}", 64 * KB, 0) == data
    (d,) = [d for d in json.loads(shell(sock, "list --json")) if d["id"] == i]
    assert (d["state"], d["daemon_alive"], d["pid"]) == ("LIVE", True, rec["pid"])
    # the tree follows the new daemon; the statistics carried on
    with open(info) as f:
        tree = json.load(f)
    assert (tree["pid"], tree["daemon_alive"], tree["recoveries"]) == (rec["pid"], True, 1)
    with open(os.path.join(mnt, f"ublkb{i}", "stats.json")) as f:
        assert json.load(f)["ops"]["write"]["ios"] >= 1

    # a device without --recovery is reported, not recovered
    j = plain["id"]
    assert "device DEAD" in shell(sock, f"kill {j}")
    assert wait_event(sock, "daemon-killed", j)["state"] == "DEAD"
    time.sleep(2)
    from ublkshell.bridge.client import Client

    with Client(sock) as c:
        kinds = [e["kind"] for e in c.call("events", last=200) if e.get("id") == j]
    assert not [k for k in kinds if "recover" in k], kinds
    shell(sock, f"del {j}")
