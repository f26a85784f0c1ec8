"""Zoned mem devices (`add -t mem --zoned`) against the real driver: the geometry the
kernel and `blkzone` see, the write-pointer rules, zone management, faults and the
trace on zone ops, fio's zoned verify, kill + recover.

Few CLI calls per test: each costs seconds under emulation."""
import errno
import json
import os
import re

import pytest

from .conftest import cli, errno_of, pattern, pread_direct, pwrite_direct, run

MB = 1 << 20
ZONE = 16 * MB
SECT_PER_ZONE = ZONE >> 9


def report(path) -> list[dict]:
    """`blkzone report`: one {start, len, wp, cond, type} per zone, in sectors; blkzone prints
    the write pointer relative to the zone's start (0 for a conventional zone)."""
    out = run(["blkzone", "report", path]).stdout
    zones = []
    for line in out.splitlines():
        m = re.search(r"start: (0x[0-9a-f]+), len (0x[0-9a-f]+), cap (0x[0-9a-f]+), wptr (0x[0-9a-f]+)"
                      r".*zcond:\s*(\d+).*\[type: (\d+)", line)
        assert m, line
        zones.append({"start": int(m[1], 16), "len": int(m[2], 16), "wp": int(m[4], 16),
                      "cond": int(m[5]), "type": int(m[6])})
    return zones


def sysfs(path, name):
    with open(f"/sys/block/{os.path.basename(path)}/queue/{name}") as f:
        return f.read().strip()


def test_geometry_write_pointer_zone_ops_faults_and_trace(devices):
    dev = devices.add("-t", "mem", "--size", "256M", "--zoned", "--zone-size", "16M", "--conv-zones", "2",
                      "--max-open", "4", "--max-active", "6")
    p, did = dev["path"], str(dev["id"])
    assert dev["zoned"] == {"zone_size": ZONE, "zones": 16, "conv_zones": 2, "max_open": 4, "max_active": 6}
    # auto: batch IO, whose commit elements carry zone append LBAs (UBLK_BATCH_F_HAS_ZONE_LBA)
    assert dev["io_mode"] == "batch" and not dev["zero_copy"]
    assert (sysfs(p, "zoned"), sysfs(p, "chunk_sectors"), sysfs(p, "nr_zones")) == (
        "host-managed", str(SECT_PER_ZONE), "16")
    assert (sysfs(p, "max_open_zones"), sysfs(p, "max_active_zones")) == ("4", "6")

    z = report(p)
    assert len(z) == 16 and all(x["len"] == SECT_PER_ZONE for x in z)
    assert [x["type"] for x in z[:3]] == [1, 1, 2], "two conventional zones, then sequential ones"
    assert [x["cond"] for x in z[:3]] == [0, 0, 1] and z[2]["wp"] == 0

    # a conventional zone takes writes anywhere
    conv = pattern(64 << 10, 1)
    pwrite_direct(p, conv, 5 * MB + 12288)
    assert pread_direct(p, len(conv), 5 * MB + 12288) == conv
    # a sequential zone only at its write pointer: off it, EIO as a real drive
    z2 = 2 * ZONE
    assert errno_of(pwrite_direct, p, pattern(4096, 2), z2 + 4096) == errno.EIO
    # after a failed write the block layer fails the zone's writes until a zone report (or
    # reset) tells it the pointer again, as for any zoned drive: the report comes from us
    assert report(p)[2]["wp"] == 0
    data = pattern(MB, 3)
    pwrite_direct(p, data, z2)
    assert errno_of(pwrite_direct, p, pattern(4096, 2), z2) == errno.EIO, "behind the pointer"
    z = report(p)
    assert (z[2]["wp"], z[2]["cond"]) == (MB >> 9, 2), "implicitly open, pointer moved"
    # reads past the pointer are zeros
    got = pread_direct(p, 2 * MB, z2)
    assert got[:MB] == data and got[MB:] == bytes(MB)

    # zone management through blkzone: finish, open, close, reset
    run(["blkzone", "finish", "-o", str(3 * SECT_PER_ZONE), "-c", "1", p])
    run(["blkzone", "open", "-o", str(4 * SECT_PER_ZONE), "-c", "1", p])
    z = report(p)
    assert (z[3]["cond"], z[3]["wp"]) == (14, SECT_PER_ZONE), "finished: full"
    assert z[4]["cond"] == 3, "explicitly open"
    assert errno_of(pwrite_direct, p, pattern(4096, 4), 3 * ZONE) == errno.EIO, "a full zone takes no write"
    run(["blkzone", "close", "-o", str(4 * SECT_PER_ZONE), "-c", "1", p])
    run(["blkzone", "reset", "-o", str(2 * SECT_PER_ZONE), "-c", "1", p])
    z = report(p)
    assert z[4]["cond"] == 1, "closed without data: empty again"
    assert (z[2]["cond"], z[2]["wp"]) == (1, 0) and pread_direct(p, MB, z2) == bytes(MB)

    # a fail rule on a zone op fails that op, and only that one; the trace names it
    r = json.loads(cli("fail", did, "op=zone_reset", "--json").stdout)["added"][0]["id"]
    assert run(["blkzone", "reset", "-o", str(3 * SECT_PER_ZONE), "-c", "1", p], check=False).returncode
    pwrite_direct(p, data, z2)
    assert report(p)[3]["cond"] == 14, "the failed reset left the zone full"
    cli("clear", did)
    tr = cli("trace", did, "--from-start", "--json", "--count", "1", "op=zone_reset", "errors", timeout=60)
    (rec,) = [json.loads(l) for l in tr.stdout.splitlines()]
    assert (rec["op"], rec["result"], rec["fault"]) == ("zone_reset", -errno.EIO, f"fail#{r}")
    run(["blkzone", "reset", p])
    assert all(x["cond"] in (0, 1) for x in report(p)), "reset all: every sequential zone empty"


@pytest.mark.parametrize("mode", ["per-tag", "batch"])
def test_fio_zbd_verify(devices, mode):
    dev = devices.add("-t", "mem", "--size", "256M", "--zoned", "--zone-size", "16M", "--conv-zones", "2",
                      "-q", "2", "--io-mode", mode)
    assert dev["io_mode"] == mode
    f = run(["fio", "--name=zbd", f"--filename={dev['path']}", "--zonemode=zbd", "--direct=1",
             "--ioengine=psync", "--rw=write", "--bs=64k", f"--offset={2 * ZONE}", "--size=96M",
             "--verify=crc32c", "--do_verify=1", "--verify_state_save=0", "--output-format=json"],
            timeout=240)
    js = json.loads(f.stdout[f.stdout.index("{"):])
    job = js["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] == 96 * MB and job["read"]["io_bytes"] == 96 * MB
    z = report(dev["path"])
    assert all(x["cond"] == 14 for x in z[2:8]), "written to the end: full"


def test_kill_and_recover_keeps_write_pointers_and_conditions(devices):
    dev = devices.add("-t", "mem", "--size", "128M", "--zoned", "--zone-size", "16M", "--conv-zones", "1",
                      "--recovery")
    p, did = dev["path"], str(dev["id"])
    a, b = pattern(3 * MB, 20), pattern(MB, 21)
    pwrite_direct(p, a, ZONE)                      # zone 1: implicitly open, 3M written
    pwrite_direct(p, b, 2 * ZONE)                  # zone 2: closed below
    run(["blkzone", "close", "-o", str(2 * SECT_PER_ZONE), "-c", "1", p])
    run(["blkzone", "open", "-o", str(3 * SECT_PER_ZONE), "-c", "1", p])
    run(["blkzone", "finish", "-o", str(4 * SECT_PER_ZONE), "-c", "1", p])
    before = report(p)
    assert [(x["cond"], x["wp"]) for x in before[1:6]] == [
        (2, (3 * MB) >> 9), (4, MB >> 9), (3, 0), (14, SECT_PER_ZONE), (1, 0)]

    # kill + recover: the new daemon adopts the zone state file and serves the same zones
    assert json.loads(cli("kill", did, "--json").stdout)["state"] == "QUIESCED"
    assert json.loads(cli("recover", did, "--json").stdout)["recoveries"] == 1
    assert report(p) == before
    assert pread_direct(p, 4 * MB, ZONE) == a + bytes(MB), "data to the pointer, zeros past it"
    # writing goes on at the pointers the dead daemon left
    assert errno_of(pwrite_direct, p, b, ZONE) == errno.EIO
    report(p)
    pwrite_direct(p, b, ZONE + 3 * MB)
    pwrite_direct(p, b, 2 * ZONE + MB)
    z = report(p)
    assert [(x["cond"], x["wp"]) for x in z[1:3]] == [(2, (4 * MB) >> 9), (2, (2 * MB) >> 9)]
    assert pread_direct(p, 2 * MB, 2 * ZONE) == b + b


# filesystem -> (mkfs, its checker, what the checker says when all is well)
ZONED_FS = {
    # metadata on the conventional zones; fsck checks write pointers against the zone report
    "f2fs": (["mkfs.f2fs", "-q", "-f", "-m"], ["fsck.f2fs"], r"Write pointers consistency\s+\[Ok"),
    # metadata and data both written sequentially, in zones of their own
    "btrfs": (["mkfs.btrfs", "-q", "-f", "-O", "zoned"], ["btrfs", "check"], r"no error found"),
}


# btrfs writes its data with zone appends: both ways a result carries the LBA back
@pytest.mark.parametrize("fs,mode", [("btrfs", "per-tag"), ("btrfs", "batch"), ("f2fs", "batch")])
def test_zoned_filesystem_files_check_and_remount(devices, scratch, fs, mode):
    """A zoned filesystem on it: files written and fsync'ed, some deleted, the filesystem's
    checker clean, and a remount reads every file back. Small zones: both reserve whole zones
    (f2fs a section per zone for its cleaner; on 2G of 64M zones it left 74 MiB to write, and
    btrfs's writeback waited for ever there), so 4M zones, as many drives' are not."""
    mkfs, checker, clean = ZONED_FS[fs]
    dev = devices.add("-t", "mem", "--size", "1G", "--zoned", "--zone-size", "4M", "--conv-zones", "16",
                      "--io-mode", mode)
    assert dev["io_mode"] == mode
    mnt = os.path.join(scratch, fs)
    os.makedirs(mnt)
    run([*mkfs, dev["path"]], timeout=300)
    run(["mount", "-t", fs, dev["path"], mnt])
    files = {f"f{i}": pattern(64 * 1024 + i * 4093, i) for i in range(40)}
    files["big"] = pattern(48 * MB, 99)
    try:
        for name, data in files.items():
            with open(os.path.join(mnt, name), "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
        for i in range(0, 40, 3):  # free blocks mid-zone: the cleaner's kind of work
            os.unlink(os.path.join(mnt, f"f{i}"))
            del files[f"f{i}"]
    finally:
        run(["umount", mnt])
    p = run([*checker, dev["path"]], check=False, timeout=300)
    assert p.returncode == 0 and re.search(clean, p.stdout + p.stderr), p.stdout + p.stderr
    run(["mount", "-t", fs, dev["path"], mnt])
    try:
        assert sorted(os.listdir(mnt)) == sorted(files)
        for name, data in files.items():
            with open(os.path.join(mnt, name), "rb") as f:
                assert f.read() == data, name
    finally:
        run(["umount", mnt])
    # the data went into sequential zones, written up to their pointers
    assert any(z["type"] == 2 and z["wp"] > 0 for z in report(dev["path"]))
    if fs == "btrfs":
        # its data went by zone append, each landing where the result said: the files read back
        tr = cli("trace", str(dev["id"]), "--from-start", "--json", "--count", "1", "op=zone_append",
                 timeout=60)
        (rec,) = [json.loads(line) for line in tr.stdout.splitlines()]
        assert rec["op"] == "zone_append" and rec["result"] > 0, rec
