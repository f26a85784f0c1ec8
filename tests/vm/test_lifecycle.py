"""Deleting devices and losing daemons: nothing may hang, nothing may be left."""
import os
import signal
import subprocess
import sys
import time

from ublkshell import procs

from .conftest import cli, pread_direct


def _gone(dev_id):
    return not os.path.exists(f"/dev/ublkc{dev_id}") and not os.path.exists(f"/dev/ublkb{dev_id}")


def _wait(cond, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def test_del_idle_removes_device_and_daemon(devices):
    dev = devices.add("-t", "mem", "--size", "16M", "-q", "2")
    assert os.path.exists(dev["path"])
    cli("del", str(dev["id"]), timeout=60)
    assert _gone(dev["id"])
    # gone, or a zombie its parent (the process that ran `add`) has yet to reap
    assert _wait(lambda: not procs.alive(dev["pid"]), 10), "daemon still running"
    assert not os.path.exists(f"/run/ublkshell/devices/{dev['id']}.json")
    assert dev["mem_path"] and not os.path.exists(dev["mem_path"]), "mem data left behind"


def test_del_unknown_device_is_one_line_error(devices):
    p = cli("del", "4000", check=False, process=True)
    assert p.returncode == 1
    assert p.stderr.strip() == "ublkshell: device 4000 does not exist"


def test_del_while_fio_runs(devices):
    dev = devices.add("-t", "null", "--size", "1G", "-q", "2")
    fio = subprocess.Popen(
        ["fio", "--name=busy", f"--filename={dev['path']}", "--rw=randrw", "--bs=4k",
         "--ioengine=io_uring", "--direct=1", "--iodepth=32", "--numjobs=2",
         "--time_based", "--runtime=60", "--output-format=terse"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)
        assert fio.poll() is None, "fio should still be running"
        t0 = time.monotonic()
        cli("del", str(dev["id"]), timeout=60)
        took = time.monotonic() - t0
        out, err = fio.communicate(timeout=30)
    finally:
        if fio.poll() is None:
            fio.kill()
    assert took < 30, f"del took {took:.1f} s"
    assert fio.returncode != 0, "fio should see its device vanish"
    assert _gone(dev["id"])


def test_sigkill_of_daemon_fails_io_and_del_cleans_up(devices):
    dev = devices.add("-t", "mem", "--size", "16M")
    assert pread_direct(dev["path"], 4096, 0) == bytes(4096)
    os.kill(dev["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    # a reader in a child: if the kernel failed to abort, the read would hang, not the test
    p = subprocess.run([sys.executable, "-c",
                        "import os,mmap,sys\n"
                        "b=mmap.mmap(-1,4096)\n"
                        "try:\n"
                        " fd=os.open(sys.argv[1],os.O_RDONLY|os.O_DIRECT); os.preadv(fd,[b],8192)\n"
                        "except OSError as e: print('error', e.errno); sys.exit(0)\n"
                        "print('read ok'); sys.exit(1)\n", dev["path"]],
                       capture_output=True, text=True, timeout=30)
    took = time.monotonic() - t0
    assert p.returncode == 0, f"IO after the daemon died should fail: {p.stdout} {p.stderr}"
    assert took < 10, f"IO took {took:.1f} s to fail"
    line = next(l for l in cli("list").stdout.splitlines() if l.split()[:1] == [str(dev["id"])])
    assert "DEAD" in line and f"{dev['pid']}†" in line, line
    cli("del", str(dev["id"]), timeout=60)
    assert _wait(lambda: _gone(dev["id"]), 10)
    assert not os.path.exists(f"/run/ublkshell/devices/{dev['id']}.json")


def test_without_cap_sys_admin_gets_one_line(devices):
    import shutil

    setpriv = shutil.which("setpriv")
    assert setpriv, "util-linux setpriv is needed"
    p = subprocess.run([setpriv, "--bounding-set=-sys_admin", "--inh-caps=-sys_admin",
                        sys.executable, "-m", "ublkshell", "add", "-t", "mem", "--size", "16M"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip() == ("ublkshell: ADD_DEV failed: Operation not permitted (EPERM): "
                                "ublk control needs root (CAP_SYS_ADMIN)"), p.stderr


def test_requested_id_in_use_is_one_line(devices):
    dev = devices.add("-t", "null", "--size", "16M")
    p = cli("add", "-t", "null", "--size", "16M", "-n", str(dev["id"]), check=False)
    assert p.returncode == 1
    assert p.stderr.strip().startswith(f"ublkshell: ADD_DEV on device {dev['id']} failed: "), p.stderr
