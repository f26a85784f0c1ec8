"""What the daemon records matches what real programs issued."""
import json
import os
import signal
import subprocess
import sys
import time

from .conftest import cli, run


def _stats(dev_id):
    return json.loads(cli("stats", str(dev_id), "--json").stdout)


def test_stats_count_exactly_what_fio_wrote(devices):
    dev = devices.add("-t", "mem", "--size", "64M", "-q", "2")
    before = _stats(dev["id"])["ops"]["write"]["ios"]
    run(["fio", "--name=w", f"--filename={dev['path']}", "--rw=randwrite", "--bs=4k", "--size=8M",
         "--ioengine=io_uring", "--direct=1", "--iodepth=16", "--norandommap", "--number_ios=1000",
         "--output-format=terse"], timeout=300)
    st = _stats(dev["id"])
    w = st["ops"]["write"]
    assert w["ios"] - before == 1000
    assert w["bytes"] == (w["ios"]) * 4096
    assert w["errors"] == 0 and st["inflight"] == 0
    assert sum(q["ops"]["write"]["ios"] for q in st["queues"]) == w["ios"]
    assert 0 < w["p50_ns"] <= w["p90_ns"] <= w["p99_ns"] <= w["p999_ns"] <= w["max_ns"]


def test_trace_shows_what_dd_issued(devices):
    dev = devices.add("-t", "mem", "--size", "64M", "-d", "16")
    # --from-start: dd's write is the device's first (the kernel's partition scan only reads),
    # and the tracer finds it whether it started before dd or (on a slow machine) after
    tracer = subprocess.Popen([sys.executable, "-m", "ublkshell", "trace", str(dev["id"]), "--json",
                               "op=write", "--count", "1", "--duration", "60s", "--from-start"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run(["dd", "if=/dev/zero", f"of={dev['path']}", "bs=64k", "count=1", "seek=37",
             "oflag=direct", "status=none"])
        out, err = tracer.communicate(timeout=60)
    finally:
        if tracer.poll() is None:
            tracer.kill()
    rec = json.loads(out.strip().splitlines()[-1])
    assert rec["op"] == "write" and rec["result"] == 65536
    assert rec["sector"] == 37 * 128 and rec["sectors"] == 128
    assert 0 <= rec["tag"] < 16 and rec["queue"] == 0 and rec["lat_ns"] > 0


def test_every_traced_tag_is_below_the_queue_depth(devices):
    dev = devices.add("-t", "null", "--size", "1G", "-q", "2", "-d", "8")
    run(["fio", "--name=r", f"--filename={dev['path']}", "--rw=randread", "--bs=4k",
         "--ioengine=io_uring", "--direct=1", "--iodepth=32", "--number_ios=500", "--size=64M",
         "--output-format=terse"], timeout=300)
    lines = cli("trace", str(dev["id"]), "--from-start", "--json", "--duration", "1s").stdout.splitlines()
    recs = [json.loads(l) for l in lines]
    assert len(recs) >= 500
    assert all(0 <= r["tag"] < 8 and r["queue"] in (0, 1) for r in recs)
    assert {r["queue"] for r in recs} == {0, 1}, "both queues should have served IO"


def test_stats_stay_readable_after_the_daemon_is_killed(devices):
    dev = devices.add("-t", "mem", "--size", "16M")
    run(["dd", "if=/dev/zero", f"of={dev['path']}", "bs=4k", "count=10", "oflag=direct", "status=none"])
    os.kill(dev["pid"], signal.SIGKILL)
    time.sleep(1)
    st = _stats(dev["id"])
    assert st["ops"]["write"]["ios"] == 10
    lat = json.loads(cli("lat", str(dev["id"]), "write", "--json").stdout)
    assert lat["ios"] == 10 and sum(b["count"] for b in lat["buckets"]) == 10


def test_ublk_json_faces_hold_to_the_schema(devices):
    """tests/test_schema.py holds every face to docs/schema.md on FUSE devices; these are the
    faces only a ublk device has (its registry entry, kill, recover, features)."""
    from ublkshell.observe import schema

    def j(kind, *args):
        return schema.check(kind, json.loads(cli(*args, "--json").stdout))

    dev = devices.add("-t", "mem", "--size", "16M", "--recovery")
    i = str(dev["id"])
    schema.check("device_entry", {k: v for k, v in dev.items() if k != "path"})
    assert (dev["name"], dev["transport"]) == (i, "ublk")
    run(["dd", "if=/dev/zero", f"of={dev['path']}", "bs=4k", "count=10", "oflag=direct", "status=none"])
    (d,) = [d for d in j("list", "list") if d["id"] == dev["id"]]
    assert d["name"] == i and (d["file"], d["loop"]) == (None, None)
    j("features", "features")
    assert j("stats", "stats", i)["device"] == i == j("lat", "lat", i, "write")["device"]
    j("inflight", "inflight", i)
    j("faults", "faults", i)
    k = j("kill", "kill", i)
    assert k["device"] == i and k["state"] == "QUIESCED"
    assert j("recover", "recover", i)["name"] == i
    assert j("del", "del", i) == {"deleted": [i], "all": False}
