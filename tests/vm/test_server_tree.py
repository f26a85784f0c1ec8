"""The server on a real device: the stats tree and the shell show the IO
that real programs issued, and survive a killed daemon."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import run


def start_server(sock, mnt):
    p = subprocess.Popen([sys.executable, "-m", "ublkshell", "serve", "--socket", sock, "--mount", mnt],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (os.path.exists(sock) and os.path.ismount(mnt)):
        assert p.poll() is None, p.stdout.read()
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.1)
    return p


@pytest.fixture
def server(scratch):
    sock = os.path.join(scratch, "s.sock")
    mnt = os.path.join(scratch, "stats")
    p = start_server(sock, mnt)
    yield sock, mnt, p
    if p.poll() is None:
        p.terminate()
        p.wait(timeout=60)
    # the server is crash-only (its stop keeps the devices): a test that failed halfway must
    # not leave its device to the next tests
    run([sys.executable, "-m", "ublkshell", "del", "-a"], check=False)
    assert not os.path.ismount(mnt), "the stats tree is still mounted"


def shell(sock, line, timeout=120):
    p = subprocess.run([sys.executable, "-m", "ublkshell", "--socket", sock, "-c", line],
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_tree_and_shell_show_real_io_and_survive_a_killed_daemon(server):
    sock, mnt, proc = server
    dev = json.loads(shell(sock, "add -t mem --size 64M -q 2 --json"))
    d = os.path.join(mnt, f"ublkb{dev['id']}")
    deadline = time.monotonic() + 10
    while not os.path.isdir(d):
        assert time.monotonic() < deadline, os.listdir(mnt)
        time.sleep(0.1)
    assert {"info", "stats", "stats.json", "latency", "inflight", "trace", "faults", "queues"} <= set(os.listdir(d))

    # a reader of the trace file, started before the IO it must see
    cat = subprocess.Popen(["timeout", "60", "head", "-n", "1"], stdin=open(os.path.join(d, "trace")),
                           stdout=subprocess.PIPE, text=True)
    time.sleep(1)
    run(["dd", "if=/dev/zero", f"of=/dev/ublkb{dev['id']}", "bs=128k", "count=1", "seek=3",
         "oflag=direct", "status=none"])
    line = cat.communicate(timeout=90)[0]
    assert " write " in line and " 768+256 " in line, line

    run(["fio", "--name=w", f"--filename=/dev/ublkb{dev['id']}", "--rw=randwrite", "--bs=4k",
         "--size=8M", "--ioengine=io_uring", "--direct=1", "--iodepth=8", "--number_ios=500",
         "--norandommap", "--output-format=terse"], timeout=300)
    with open(os.path.join(d, "stats.json")) as f:
        st = json.load(f)
    assert st["ops"]["write"]["ios"] == 501  # dd's one write and fio's 500
    assert json.loads(shell(sock, f"stats {dev['id']} --json"))["ops"]["write"]["ios"] == 501

    os.kill(dev["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:
        events = json.loads(subprocess.run(
            [sys.executable, "-c", "import json,sys; from ublkshell.bridge.client import Client; "
             "print(json.dumps(Client(sys.argv[1]).call('events')))", sock],
            capture_output=True, text=True, timeout=60).stdout)
        if any(e["kind"] == "daemon-died" and e["id"] == dev["id"] for e in events):
            break
        assert time.monotonic() < deadline, events
        time.sleep(0.5)
    with open(os.path.join(d, "stats.json")) as f:
        assert json.load(f)["ops"]["write"]["ios"] == 501, "stats must outlive the daemon"
    with open(os.path.join(d, "info")) as f:
        assert "mem" in f.read()

    proc.terminate()
    assert proc.wait(timeout=60) == 0
    assert not os.path.ismount(mnt)
    # crash-only: the device belongs to its daemon, not to the server
    assert os.path.exists(f"/dev/ublkc{dev['id']}"), "a stopped server must leave its devices alone"
    run([sys.executable, "-m", "ublkshell", "del", str(dev["id"])])
    assert not os.path.exists(f"/dev/ublkc{dev['id']}")


def test_a_killed_server_leaves_io_running_and_the_next_one_serves_the_device(scratch):
    """SIGKILL the server while fio runs: the IO never notices, and a new server's
    tree and shell show the same device with its counters still growing."""
    sock, mnt = os.path.join(scratch, "s.sock"), os.path.join(scratch, "stats")
    srv = start_server(sock, mnt)
    dev = json.loads(shell(sock, "add -t mem --size 32M --json"))
    fio = subprocess.Popen(["fio", "--name=v", f"--filename=/dev/ublkb{dev['id']}", "--rw=randwrite", "--bs=4k",
                            "--size=32M", "--time_based", "--runtime=120", "--ioengine=io_uring", "--direct=1",
                            "--iodepth=8", "--verify=crc32c", "--verify_backlog=64", "--verify_state_save=0",
                            "--output-format=json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(4)
        srv.kill()
        srv.wait(timeout=30)
        srv = start_server(sock, mnt)
        stats = os.path.join(mnt, f"ublkb{dev['id']}", "stats.json")
        with open(stats) as f:
            before = json.load(f)["ops"]["write"]["ios"]
        deadline = time.monotonic() + 20
        while True:
            with open(stats) as f:
                after = json.load(f)["ops"]["write"]["ios"]
            if after > before > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert fio.poll() is None and after > before > 0, (before, after, fio.poll())
        assert json.loads(shell(sock, f"stats {dev['id']} --json"))["ops"]["write"]["ios"] >= after
        # proven: end fio now rather than at its runtime (it exits 128 on SIGINT, results printed)
        fio.send_signal(signal.SIGINT)
        out, err = fio.communicate(timeout=180)
        assert fio.returncode in (0, 128) and "verify" not in err, err
        job = json.loads(out[out.index("{"):])["jobs"][0]
        assert job["error"] == 0 and job["write"]["total_ios"] > 0, job["write"]
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.communicate()
        srv.terminate()
        srv.wait(timeout=60)
        run([sys.executable, "-m", "ublkshell", "del", str(dev["id"])], check=False)
    assert not os.path.ismount(mnt)
