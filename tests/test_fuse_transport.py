"""The FUSE transport on the host, for real: `add --transport fuse` mounts a
FUSE file served by the native targets, `--loop` attaches it to a real loop
device, and ext4, dd, blkdiscard and the stats/trace readers run against
that. Needs root, /dev/fuse and the loop driver; no ublk_drv.

Every test uses its own state and memory directories, so it sees only the
devices it made, and checks that nothing stays mounted or attached."""
import errno
import hashlib
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ublkshell.devices import ids as devids

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control")
    or not shutil.which("losetup") or not shutil.which("mkfs.ext4"),
    reason="the FUSE transport needs root, /dev/fuse, the loop driver, losetup and mkfs.ext4")

MiB = 1 << 20


class Env:
    def __init__(self, root):
        self.root = str(root)
        self.state = os.path.join(self.root, "state")
        self.mem = os.path.join(self.root, "mem")
        os.makedirs(self.mem, mode=0o700)
        self.env = dict(os.environ, UBLKSHELL_STATE_DIR=self.state, UBLKSHELL_DATA_DIR=self.mem)
        self.added = []

    def run(self, *args, timeout=60, check=True):
        p = subprocess.run([sys.executable, "-m", "ublkshell", *args], capture_output=True, text=True,
                           timeout=timeout, env=self.env)
        if check:
            assert p.returncode == 0, (args, p.returncode, p.stdout, p.stderr)
        return p

    def json(self, *args, **kw):
        return json.loads(self.run(*args, "--json", **kw).stdout)

    def add(self, *args) -> dict:
        dev = self.json("add", "--transport", "fuse", *args)
        self.added.append(dev)
        return dev

    def trace(self, name, count):
        out = self.run("trace", name, "--from-start", "--count", str(count), "--duration", "10s", "--json")
        return [json.loads(line) for line in out.stdout.splitlines()]

    def registry(self) -> list[str]:
        d = os.path.join(self.state, "devices")
        return sorted(os.listdir(d)) if os.path.isdir(d) else []

    def our_mounts(self) -> list[str]:
        with open("/proc/self/mountinfo") as f:
            return [line for line in f if self.root in line]

    def our_loops(self) -> list[str]:
        """Loop devices still holding an attach one of our devices made."""
        return [d["loop"] for d in self.added if still_attached(d)]


@pytest.fixture
def env(tmp_path_factory):
    # a short path: it shows up in mount tables and losetup listings
    e = Env(tmp_path_factory.mktemp("fuse"))
    yield e
    e.run("del", "-a", check=False)
    for line in e.our_mounts():
        subprocess.run(["umount", "-l", line.split()[4]], capture_output=True)
    for loop in e.our_loops():
        subprocess.run(["losetup", "-d", loop], capture_output=True)
    assert not e.our_mounts() and not e.our_loops(), "a test left something behind"


def still_attached(dev: dict) -> bool:
    """The loop device of dev still holds the file it attached (same diskseq: not reused since)."""
    if not dev.get("loop"):
        return False
    sysdir = f"/sys/block/{os.path.basename(dev['loop'])}"
    if not os.path.exists(f"{sysdir}/loop/backing_file"):
        return False
    with open(f"{sysdir}/diskseq") as f:
        return int(f.read()) == dev["loop_seq"]


def assert_gone(env: Env, dev: dict) -> None:
    """del leaves no mount, no loop device, no registry entry, no statistics, no data file."""
    assert not env.our_mounts()
    assert not still_attached(dev)
    assert not os.path.exists(dev["mount"])
    assert env.registry() == []
    assert os.listdir(env.mem) == []


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def pread_direct(path, offset, length) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, length)
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n])
    finally:
        os.close(fd)


def pwrite_direct(path, offset, data: bytes) -> None:
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
    finally:
        os.close(fd)


# -- ids ----------------------------------------------------------------------
def test_fuse_ids_have_their_own_names():
    assert devids.name(3) == "3" and devids.stem(3) == "ublkb3"
    f0 = devids.parse("fuse0")
    assert devids.is_fuse(f0) and not devids.is_fuse(3) and devids.name(f0) == "fuse0"
    assert devids.stem(f0) == "fuse0" and devids.from_stem("fuse0") == f0 and devids.from_name("fuse0") == f0
    assert devids.parse(str(f0)) == f0 and devids.parse("7") == 7
    # one spelling per id in paths; a ublk id never reaches the FUSE range
    assert devids.from_stem("ublkb03") is None and devids.from_stem("fuse01") is None
    assert devids.from_stem(f"ublkb{f0}") is None and devids.from_name("x1") is None
    for bad in ("", "fuse", "fusex", "-1", "ublkb0", "1.5"):
        with pytest.raises(ValueError):
            devids.parse(bad)


# -- mem through a loop device, with ext4 on it ------------------------------
def test_mem_loop_ext4_files_survive_and_stats_count(env, tmp_path):
    dev = env.add("-t", "mem", "--size", "256M", "--loop")
    assert dev["name"] == "fuse0" and dev["transport"] == "fuse"
    loop, disk = dev["loop"], dev["file"]
    assert loop.startswith("/dev/loop") and disk == os.path.join(env.state, "fuse", "fuse0", "disk")
    assert os.path.getsize(disk) == 256 * MiB
    with open(f"/sys/block/{os.path.basename(loop)}/loop/backing_file") as f:
        assert f.read().strip() == disk

    listed = env.run("list").stdout
    assert "fuse0" in listed and loop in listed and disk in listed and "LIVE" in listed
    (entry,) = env.json("list")
    assert entry["name"] == "fuse0" and entry["loop"] == loop and entry["daemon_alive"]

    subprocess.run(["mkfs.ext4", "-q", "-F", loop], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    files = {"a.bin": os.urandom(3 * MiB + 123), "b.bin": os.urandom(700_000), "c.txt": b"hello fuse\n" * 1000}
    subprocess.run(["mount", loop, str(mnt)], check=True)
    try:
        for name, data in files.items():
            (mnt / name).write_bytes(data)
        os.sync()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    # nothing cached above the device: the next reads come through FUSE
    subprocess.run(["blockdev", "--flushbufs", loop], check=True)
    subprocess.run(["mount", "-o", "ro", loop, str(mnt)], check=True)
    try:
        for name, data in files.items():
            assert sha(mnt / name) == hashlib.sha256(data).hexdigest(), name
    finally:
        subprocess.run(["umount", str(mnt)], check=True)

    st = env.json("stats", "fuse0")
    assert st["device"] == "fuse0"
    ops = st["ops"]
    written = sum(len(d) for d in files.values())
    assert ops["write"]["ios"] > 0 and ops["write"]["bytes"] >= written
    assert ops["read"]["ios"] > 0 and ops["flush"]["ios"] > 0
    assert ops["write"]["errors"] == ops["read"]["errors"] == 0
    assert len(st["queues"]) == 1
    assert "dev fuse0:" in env.run("stats", "fuse0").stdout
    assert env.run("inflight", "fuse0").stdout.strip() == "dev fuse0: nothing in flight"

    total = sum(o["ios"] for o in ops.values())
    n = min(total, 2000)
    recs = env.trace("fuse0", n)
    assert len(recs) == n
    seen = {r["op"] for r in recs}
    assert {"read", "write", "flush"} <= seen
    for r in recs:
        assert r["queue"] == 0 and 0 <= r["tag"] < 128
        if r["op"] in ("read", "write"):
            assert r["result"] == r["sectors"] * 512 and r["sector"] + r["sectors"] <= (256 * MiB) >> 9
        else:
            assert r["result"] == 0
    text = env.run("trace", "fuse0", "--from-start", "--count", "3", "op=write").stdout.splitlines()
    assert len(text) == 4 and all(" write " in line for line in text[1:])

    # the data lives in the mem file, sparse
    mem = os.path.join(env.mem, "fuse0.mem")
    assert os.path.getsize(mem) == 256 * MiB and 0 < os.stat(mem).st_blocks * 512 < 256 * MiB

    assert env.run("del", "fuse0").stdout.strip() == "dev fuse0 deleted"
    assert_gone(env, dev)


# -- loop target over a file --------------------------------------------------
def test_loop_target_over_a_file(env, tmp_path):
    backing = tmp_path / "backing.img"
    data = bytearray(os.urandom(8 * MiB))
    backing.write_bytes(data)
    # a device larger than its file: past the file's end it reads zeros
    dev = env.add("-t", "loop", "-f", str(backing), "--size", "12M", "--loop")
    loop, disk = dev["loop"], dev["file"]
    assert dev["describe"] == f"loop {backing}" and dev["size"] == 12 * MiB

    assert pread_direct(loop, 0, 8 * MiB) == bytes(data)
    assert pread_direct(loop, 8 * MiB, 4 * MiB) == bytes(4 * MiB)
    # the FUSE file itself, in whole sectors as a block device (a part of one is EINVAL)
    fd = os.open(disk, os.O_RDONLY)
    try:
        assert os.pread(fd, 1536, 12288) == bytes(data[12288:12288 + 1536])
        for size, off in ((777, 12288), (512, 12345)):
            with pytest.raises(OSError) as e:
                os.pread(fd, size, off)
            assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)

    block = os.urandom(64 * 1024)
    pwrite_direct(loop, MiB, block)
    subprocess.run(["blockdev", "--flushbufs", loop], check=True)
    with open(backing, "rb") as f:
        f.seek(MiB)
        assert f.read(len(block)) == block

    # discard punches, write-zeroes zeroes: both read back as zeros from the backing file
    subprocess.run(["blkdiscard", "-o", str(2 * MiB), "-l", str(MiB), loop], check=True)
    subprocess.run(["blkdiscard", "-z", "-o", str(4 * MiB), "-l", str(MiB), loop], check=True)
    with open(backing, "rb") as f:
        f.seek(2 * MiB)
        assert f.read(MiB) == bytes(MiB)
        f.seek(4 * MiB)
        assert f.read(MiB) == bytes(MiB)
        f.seek(5 * MiB)
        assert f.read(MiB) == bytes(data[5 * MiB:6 * MiB])

    ops = env.json("stats", "fuse0")["ops"]
    assert ops["read"]["ios"] > 0 and ops["write"]["ios"] > 0
    assert ops["discard"]["ios"] + ops["write_zeroes"]["ios"] >= 2
    total = sum(o["ios"] for o in ops.values())
    recs = env.trace("fuse0", min(total, 5000))
    assert any(r["op"] == "write" and r["sector"] == MiB >> 9 for r in recs)
    assert any(r["op"] in ("discard", "write_zeroes") and r["sector"] == (2 * MiB) >> 9 for r in recs)

    env.run("del", "fuse0")
    assert_gone(env, dev)
    assert backing.stat().st_size == 8 * MiB  # the backing file stays


# -- null --------------------------------------------------------------------
def test_null_reads_zeros_and_drops_writes(env):
    dev = env.add("-t", "null", "--size", "1G", "--loop", "--block-size", "4k")
    loop, disk = dev["loop"], dev["file"]
    out = subprocess.run(["blockdev", "--getss", "--getsize64", loop], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["4096", str(1 << 30)]
    pwrite_direct(loop, 0, os.urandom(MiB))
    assert pread_direct(loop, 0, MiB) == bytes(MiB)
    assert pread_direct(loop, (1 << 30) - MiB, MiB) == bytes(MiB)
    fd = os.open(disk, os.O_RDONLY)
    try:
        assert os.pread(fd, 5120, 1024) == bytes(5120)
    finally:
        os.close(fd)
    ops = env.json("stats", "fuse0")["ops"]
    assert ops["write"]["bytes"] >= MiB and ops["read"]["bytes"] >= 2 * MiB
    # the same fault engine as ublk's: a rule applies to the next IO
    env.run("fail", "fuse0", "op=read", "count=1")
    with pytest.raises(OSError) as e:
        pread_direct(loop, 0, 4096)
    assert e.value.errno == errno.EIO
    assert pread_direct(loop, 0, 4096) == bytes(4096)
    env.run("del", "fuse0")
    assert_gone(env, dev)


def test_no_records_keeps_no_counters_and_faults_still_apply(env):
    dev = env.add("-t", "mem", "--size", "16M", "--loop", "--no-records")
    data = os.urandom(MiB)
    pwrite_direct(dev["loop"], 0, data)
    assert pread_direct(dev["loop"], 0, MiB) == data
    assert all(o["ios"] == 0 for o in env.json("stats", "fuse0")["ops"].values())
    env.run("fail", "fuse0", "op=read", "count=1")
    with pytest.raises(OSError) as e:
        pread_direct(dev["loop"], 0, 4096)
    assert e.value.errno == errno.EIO
    assert pread_direct(dev["loop"], 0, 4096) == data[:4096]
    env.run("del", "fuse0")
    assert_gone(env, dev)


def test_without_loop_the_file_is_the_device(env):
    dev = env.add("-t", "mem", "--size", "16M")
    assert dev["loop"] is None and env.json("list")[0]["loop"] is None
    assert "BLOCK DEV" in env.run("list").stdout
    fd = os.open(dev["file"], os.O_RDWR)
    try:
        assert os.pwrite(fd, b"x" * 3072, 1024) == 3072
        os.fsync(fd)
        assert os.pread(fd, 3072, 1024) == b"x" * 3072
        # a block device does not grow
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"y" * 512, 16 * MiB)
        assert e.value.errno == errno.ENOSPC
        assert os.pread(fd, 10, 16 * MiB) == b""
    finally:
        os.close(fd)
    assert os.path.getsize(dev["file"]) == 16 * MiB
    recs = env.trace("fuse0", 3)
    assert [(r["op"], r["sector"], r["sectors"], r["result"]) for r in recs] == [
        ("write", 2, 6, 3072), ("flush", 0, 0, 0), ("read", 2, 6, 3072)]
    env.run("del", "fuse0")
    assert_gone(env, dev)


# -- ids, several devices, the stats tree and the server ----------------------
def test_ids_and_several_devices(env):
    a = env.add("-t", "null", "--size", "8M")
    b = env.add("-t", "null", "--size", "8M", "-n", "5")
    c = env.add("-t", "null", "--size", "8M")
    assert [a["name"], b["name"], c["name"]] == ["fuse0", "fuse5", "fuse1"]
    p = env.run("add", "--transport", "fuse", "-t", "null", "--size", "8M", "-n", "5", check=False)
    assert p.returncode == 1 and p.stderr.strip() == "ublkshell: device fuse5 exists already"
    assert env.registry() == ["fuse0.json", "fuse1.json", "fuse5.json"]
    assert sorted(os.listdir(env.mem)) == ["fuse0.stats", "fuse1.stats", "fuse5.stats"]
    assert env.run("del", "fuse5", "fuse0").stdout.splitlines() == ["dev fuse5 deleted", "dev fuse0 deleted"]
    assert [d["name"] for d in env.json("list")] == ["fuse1"]
    # the raw number names the same device
    env.run("stats", str(devids.parse("fuse1")))
    assert env.run("del", "-a").stdout.strip() == "deleted 1 device"
    assert not env.our_mounts()


def test_server_tree_and_shell_see_fuse_devices(env, tmp_path):
    sock, tree = str(tmp_path / "s.sock"), tmp_path / "tree"
    tree.mkdir()
    srv = subprocess.Popen([sys.executable, "-m", "ublkshell", "serve", "--socket", sock, "--mount", str(tree)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env.env, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (os.path.exists(sock) and os.path.ismount(tree)):
            assert srv.poll() is None, srv.stdout.read()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        out = env.run("--socket", sock, "-c", "add --transport fuse -t mem --size 32M --loop").stdout
        assert out.startswith("dev fuse0 -> /dev/loop")
        dev = env.json("list")[0]
        written = os.urandom(256 * 1024)
        pwrite_direct(dev["loop"], 0, written)
        assert sorted(os.listdir(tree)) == ["fuse0", "metrics"]
        st = json.loads((tree / "fuse0" / "stats.json").read_text())
        assert st["ops"]["write"]["ios"] >= 1 and st["ops"]["write"]["bytes"] >= 256 * 1024
        metrics = (tree / "metrics").read_text().splitlines()
        assert 'ublkshell_daemon_up{device="fuse0"} 1' in metrics
        assert f'ublkshell_io_bytes_total{{device="fuse0",queue="0",op="write"}} {st["ops"]["write"]["bytes"]}' in metrics
        info = (tree / "fuse0" / "info").read_text()
        assert "device      fuse0" in info and dev["loop"] in info
        shell = env.run("--socket", sock, "-c", "stats fuse0").stdout
        assert shell.startswith("dev fuse0:") and "write" in shell
        assert "fuse0" in env.run("--socket", sock, "-c", "list").stdout
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.wait(timeout=30)
    # crash-only: a stopped server unmounts its tree and leaves the devices to their daemons
    assert not os.path.ismount(tree)
    (left,) = env.json("list")
    assert left["name"] == "fuse0" and left["daemon_alive"] and left["loop"] == dev["loop"]
    assert pread_direct(dev["loop"], 0, len(written)) == written
    env.run("del", "fuse0")
    assert not env.our_mounts() and not env.our_loops() and env.registry() == []


def _server(env, sock, tree):
    srv = subprocess.Popen([sys.executable, "-m", "ublkshell", "serve", "--socket", sock, "--mount", str(tree)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env.env, text=True)
    deadline = time.monotonic() + 30
    while not (os.path.exists(sock) and os.path.ismount(tree)):
        assert srv.poll() is None, srv.stdout.read()
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    return srv


def test_a_killed_server_loses_nothing_and_the_next_one_adopts_the_devices(env, tmp_path):
    """Crash-only: whatever ends the server (here SIGKILL, as the OOM killer would),
    the devices and their data stay, and a new server serves them as before."""
    sock, tree = str(tmp_path / "s.sock"), tmp_path / "tree"
    tree.mkdir()
    srv = _server(env, sock, tree)
    try:
        env.run("--socket", sock, "-c", "add --transport fuse -t mem --size 32M --loop")
        dev = env.json("list")[0]
        env.added.append(dev)
        written = os.urandom(512 * 1024)
        pwrite_direct(dev["loop"], 0, written)
    finally:
        srv.kill()
        srv.wait(timeout=30)
    (left,) = env.json("list")
    assert left["daemon_alive"] and pread_direct(dev["loop"], 0, len(written)) == written
    # the dead server's tree is a dead mount: the next server clears it and mounts its own
    srv = _server(env, sock, tree)
    try:
        assert sorted(os.listdir(tree)) == ["fuse0", "metrics"]
        st = json.loads((tree / "fuse0" / "stats.json").read_text())
        assert st["ops"]["write"]["bytes"] >= len(written)
        events = env.run("--socket", sock, "-c", "stats fuse0").stdout
        assert events.startswith("dev fuse0:")
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.wait(timeout=30)
    assert pread_direct(dev["loop"], 0, len(written)) == written
    env.run("del", "fuse0")
    assert not env.our_mounts() and not env.our_loops() and env.registry() == []


# -- a daemon that dies --------------------------------------------------------
def test_killed_daemon_leaves_nothing_that_hangs(env):
    dev = env.add("-t", "mem", "--size", "32M", "--loop")
    pwrite_direct(dev["loop"], 0, os.urandom(MiB))
    os.kill(dev["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{dev['pid']}") and time.monotonic() < deadline:
        time.sleep(0.05)
    # the connection is aborted: IO fails at once instead of waiting for a daemon
    probe = subprocess.run(["dd", f"if={dev['loop']}", "of=/dev/null", "bs=4k", "count=1", "iflag=direct"],
                           capture_output=True, timeout=30)
    assert probe.returncode != 0
    probe = subprocess.run(["stat", dev["file"]], capture_output=True, text=True, timeout=30)
    assert probe.returncode != 0 and "not connected" in probe.stderr

    # list cleans the dead mount and the loop device, and shows the device as dead
    t0 = time.monotonic()
    listed = env.run("list", timeout=30).stdout
    assert time.monotonic() - t0 < 20
    assert "DEAD" in listed and "†" in listed
    assert not env.our_mounts() and not env.our_loops()
    # its numbers stay readable until del
    assert env.json("stats", "fuse0")["ops"]["write"]["ios"] > 0
    env.run("del", "fuse0")
    assert_gone(env, dev)


def test_del_cleans_up_after_a_killed_daemon_itself(env):
    dev = env.add("-t", "null", "--size", "32M", "--loop")
    os.kill(dev["pid"], signal.SIGKILL)
    time.sleep(0.3)
    env.run("del", "fuse0", timeout=30)
    assert_gone(env, dev)


# -- bad input and failures: one line, nothing left ---------------------------
@pytest.mark.parametrize("args,message", [
    (["add", "--transport", "nbd", "-t", "mem", "--size", "1G"],
     "ublkshell: --transport: unknown transport 'nbd' (choose from ublk, fuse)"),
    (["add", "-t", "mem", "--size", "1G", "--loop"],
     "ublkshell: --loop is only for --transport fuse (a ublk device is a block device already)"),
    (["add", "--transport", "ublk", "-t", "null", "--size", "1G", "--loop"],
     "ublkshell: --loop is only for --transport fuse (a ublk device is a block device already)"),
    (["add", "--transport", "fuse", "-t", "mem", "--size", "1G", "-q", "2"],
     "ublkshell: -q/--queues: the FUSE transport has one queue, not 2 (its worker threads share it)"),
    (["add", "--transport", "fuse", "-t", "mem"], "ublkshell: --size is required for the mem target (e.g. --size 1G)"),
    (["stats", "fusex"], "ublkshell: argument id: 'fusex' is not a device id (a number like 0, or fuseN for a FUSE device)"),
])
def test_bad_input_is_one_line(env, args, message):
    p = env.run(*args, check=False)
    assert p.returncode == 2 and p.stderr.strip() == message and "Traceback" not in p.stderr


def test_unknown_fuse_devices_are_one_line(env):
    for args, msg in ((["del", "fuse9"], "ublkshell: device fuse9 does not exist"),
                      (["stats", "fuse9"], "ublkshell: device fuse9 has no statistics (not served by ublkshell?)"),
                      # the name people typed, never the internal number behind it
                      (["powercut", "fuse9"], "ublkshell: device fuse9 is not served by ublkshell"),
                      (["faults", "fuse9"], "ublkshell: device fuse9 is not served by ublkshell (no ")):
        p = env.run(*args, check=False)
        assert p.returncode == 1 and p.stderr.strip().startswith(msg), p.stderr
        assert str(devids.FUSE_BASE + 9) not in p.stderr


def _in_private_dev(env, script: str) -> subprocess.CompletedProcess:
    """Run a shell script (fixed text) in its own mount namespace with an empty tmpfs on /dev."""
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           "mount -t tmpfs none /dev && " + script],
                          capture_output=True, text=True, timeout=120,
                          env=dict(env.env, PY=sys.executable, ROOT=str(env.root)))


@pytest.mark.skipif(not shutil.which("unshare"), reason="needs unshare (util-linux)")
def test_no_dev_fuse_is_one_line(env):
    p = _in_private_dev(env, '"$PY" -m ublkshell add --transport fuse -t mem --size 64M --loop')
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip() == ("ublkshell: no /dev/fuse: the FUSE transport needs the kernel's fuse "
                                "module (`modprobe fuse`)")
    assert env.registry() == [] and os.listdir(env.mem) == []


@pytest.mark.skipif(not shutil.which("unshare"), reason="needs unshare (util-linux)")
def test_losetup_failing_is_one_line_and_leaves_nothing(env):
    # /dev has fuse but no loop-control: losetup really fails to find a device
    p = _in_private_dev(env, 'mknod -m 600 /dev/fuse c 10 229 && mknod -m 666 /dev/null c 1 3 && '
                             '"$PY" -m ublkshell add --transport fuse -t mem --size 64M --loop; rc=$?; '
                             # the namespace starts with a copy of the host's mounts: count only ours
                             'echo "mounts: $(grep fuse.ublkshell /proc/self/mountinfo | grep -c "$ROOT")"; '
                             'exit $rc')
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip() == "ublkshell: losetup failed: cannot find an unused loop device"
    assert p.stdout.strip() == "mounts: 0"
    assert env.registry() == [] and os.listdir(env.mem) == []
    assert os.listdir(os.path.join(env.state, "fuse")) == [".lock"]


def test_demo_without_ublk_drv_or_vm_runs_on_the_fuse_transport(env):
    if os.path.exists("/dev/ublk-control"):
        pytest.skip("this kernel has ublk_drv: the demo takes it")
    p = env.run("demo", "--no-vm", "--size", "64M", timeout=300)
    assert "through the FUSE transport and a loop device" in p.stdout
    assert "fsck.ext4 -fn" in p.stdout and "all good" in p.stdout.splitlines()[-1], p.stdout
    assert "list: dev fuse" in p.stdout
    assert env.registry() == [] and env.our_mounts() == [] and env.our_loops() == []
