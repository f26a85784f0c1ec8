"""`crashtest` and the crash-state model behind it.

The model (crash/states.py) is checked against its definition with Hypothesis: each state is
a subset of one epoch's writes on top of everything before the epoch, and `replay --to-entry
--skip`, the command crashtest prints, rebuilds exactly that state. Then the real thing on
FUSE devices over real loop devices: ext4 with barriers survives every state tried; ext4 with
nobarrier does not; a toy "commit" that writes its header without a flush after its data is
caught, and the printed command rebuilds a state that fails the same check; the same toy with
the flush passes."""
import json
import os
import random
import shutil

import pytest
from hypothesis import given, settings, strategies as st

from ublkshell.crash import logwrites, states
from ublkshell.crash.logwrites import DISCARD, FLUSH, FUA, MARK
from ublkshell.observe import schema

from vm.conftest import cli

S = 512


def entry(i, flags, sector=0, n=0):
    return logwrites.Entry(i, sector, n, flags, "m" if flags & MARK else None,
                           -1 if flags & (FLUSH | MARK | DISCARD) and not flags & FUA or not n else 1)


logs = st.lists(st.sampled_from(["w", "fua", "flush", "discard", "mark"]), max_size=40)


@settings(max_examples=200, deadline=None)
@given(kinds=logs, n_random=st.integers(0, 4), seed=st.integers(0, 1000))
def test_epochs_and_states_follow_the_model(kinds, n_random, seed):
    flags = {"w": 0, "fua": FUA, "flush": FLUSH, "discard": DISCARD, "mark": MARK}
    entries = [entry(i, flags[k], 8 * i, 0 if k in ("flush", "mark") else 8) for i, k in enumerate(kinds)]
    eps = states.epochs(entries, -1)
    # every write and discard is in exactly one epoch, in log order
    seen = [e.index for ep in eps for e in ep.writes]
    assert seen == [e.index for e in entries if e.data_at >= 0 or e.flags & DISCARD]
    base = -1
    for ep in eps:
        assert ep.base == base
        if ep.point is not None:
            assert ep.point.persists
            assert all(w.index <= ep.point.index for w in ep.writes)
            base = ep.point.index
        assert all(w.index > ep.base for w in ep.writes)
    rng = random.Random(seed)
    for i, ep in enumerate(eps):
        sts = states.states(ep, n_random, rng, first=(i == 0))
        keys = [s.applied for s in sts]
        assert len(keys) == len(set(keys)), "a state is tried twice"
        k = len(ep.writes)
        if not k:
            continue
        assert tuple(range(k)) in keys, "the state at the point is not tried"
        for j in range(0 if i == 0 else 1, k):
            assert tuple(range(j)) in keys
        if k >= 2:
            for drop in range(k):
                assert tuple(p for p in range(k) if p != drop) in keys
        for s in sts:
            assert list(s.applied) == sorted(set(s.applied)) and all(0 <= p < k for p in s.applied)
            # what `replay --to-entry last --skip ...` applies is exactly the state
            replayed = [e.index for e in entries if e.index <= s.last_entry
                        and (e.data_at >= 0 or e.flags & DISCARD) and e.index not in s.skipped]
            before = [e.index for e in entries if e.index <= ep.base and (e.data_at >= 0 or e.flags & DISCARD)]
            assert replayed == before + [ep.writes[p].index for p in s.applied]


# -- the real thing: FUSE devices on loop devices ------------------------------------------------
pytestmark_fuse = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not os.path.exists("/dev/loop-control")
    or not shutil.which("mkfs.ext4") or not shutil.which("losetup"),
    reason="crashtest on the host needs root, FUSE, loop devices and mkfs.ext4")

WORKLOAD = ("mkdir d; for i in $(seq 1 30); do head -c 20000 /dev/urandom > d/f$i; mkdir d/s$i; done; sync; "
            "for i in $(seq 1 30 2); do rm -r d/f$i d/s$i; mv d/f$((i+1)) d/g$i; done; sync")


@pytest.fixture
def env(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "mem", mode=0o700)
    monkeypatch.setenv("UBLKSHELL_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("UBLKSHELL_DATA_DIR", str(tmp_path / "mem"))
    work = tmp_path / "work"
    work.mkdir()
    yield tmp_path, work
    # nothing left behind: no device, no mount, no image
    assert "fuse" not in cli("list").stdout.split("\n", 1)[-1]
    assert str(work) not in open("/proc/mounts").read()
    assert not [p for p in work.rglob("*.img")]


def crashtest(work, *args, check=True):
    r = cli("crashtest", "--workdir", str(work), "--size", "48M", "--json", *args, check=False)
    if check:
        assert r.returncode in (0, 1), r.stderr
        got = json.loads(r.stdout)
        schema.check("crashtest", got)
        return r.returncode, got
    return r


@pytestmark_fuse
def test_ext4_with_barriers_survives_every_state_and_without_them_does_not(env):
    _, work = env
    rc, got = crashtest(work, "--states", "2", "--", "sh", "-c", WORKLOAD)
    assert rc == 0 and got["failed"] == 0 and got["states"] >= got["epochs"] >= 5, got
    rc, got = crashtest(work, "--mount-opts", "nobarrier", "--states", "4", "--", "sh", "-c", WORKLOAD)
    assert rc == 1 and got["failed"] > 0, got
    f = got["first_failure"]
    assert f["point"] is None, "without barriers there is no persistence point in the workload"
    assert f["why"] and f["rebuild"].startswith(f"ublkshell replay {got['log']} NEW.img --size"), f
    assert os.path.exists(got["log"]), "the log of a failing run is kept"


TOY_CHECK = ("python3 -c \"import sys; d = open(sys.argv[1], 'rb').read(8192); "
             "sys.exit(0 if d[:6] != b'COMMIT' or d[4096:] == b'D' * 4096 else 1)\" {}")


def toy(tmp, flush_between: bool):
    (tmp / "D").write_bytes(b"D" * 4096)
    (tmp / "H").write_bytes(b"COMMIT".ljust(4096, b"\0"))
    sync = " conv=fsync" if flush_between else ""
    return (f"dd if={tmp}/D of=$UBLKSHELL_DEV bs=4k seek=1 oflag=direct status=none{sync}; "
            f"dd if={tmp}/H of=$UBLKSHELL_DEV bs=4k oflag=direct status=none conv=fsync")


@pytestmark_fuse
def test_a_commit_without_a_flush_before_its_header_is_caught_and_rebuilt(env):
    tmp, work = env
    rc, got = crashtest(work, "--fs", "none", "--check", TOY_CHECK, "--", "sh", "-c", toy(tmp, False))
    assert rc == 1 and got["failed"] == 1, got
    f = got["first_failure"]
    assert [w["persisted"] for w in f["writes"]] == [False, True] and f["kind"] == "drop", f
    # the printed command rebuilds a state that fails the same check
    argv = f["rebuild"].split()
    img = str(tmp / "rebuilt.img")
    cli(*argv[1:3], img, *argv[4:])
    assert open(img, "rb").read(6) == b"COMMIT"
    assert open(img, "rb").read(8192)[4096:] == bytes(4096)

    rc, got = crashtest(work, "--fs", "none", "--check", TOY_CHECK, "--", "sh", "-c", toy(tmp, True))
    assert rc == 0 and got["failed"] == 0 and got["states"] >= 2, got


@pytestmark_fuse
def test_bad_requests_are_one_line_errors_and_leave_nothing(env, tmp_path):
    _, work = env
    (tmp_path / "taken.log").write_bytes(b"x")
    for args, why in ((["--fs", "zfs", "--", "true"], "choose from"),
                      (["--fs", "none", "--", "true"], "give --check"),
                      ([], "workload"),
                      (["--size", "1G0", "--", "true"], "not a size"),
                      (["--log", str(tmp_path / "taken.log"), "--", "true"], "exists"),
                      (["--", "sh", "-c", "exit 3"], "exited 3"),
                      (["--", "/nonexistent/prog"], "No such file"),
                      (["--mkfs-opts", "-O bogus_feature", "--", "true"], "mkfs failed")):
        r = crashtest(work, *args, check=False)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode != 0 and why in last and "Traceback" not in r.stderr, (args, r.stderr)
        # progress lines first ("crashtest: ..."), then the error: one line
        assert [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("crashtest: ")] == [last], \
            r.stderr
    assert (tmp_path / "taken.log").read_bytes() == b"x"
    assert list(work.iterdir()) == [], "a failed crashtest left files behind"


@pytestmark_fuse
def test_a_crashtest_killed_halfway_leaves_nothing(env):
    """SIGTERM while the workload runs: the workload, its mount, the device and the work
    directory all go, as on Ctrl-C."""
    import signal
    import subprocess
    import sys
    import time

    _, work = env
    p = subprocess.Popen([sys.executable, "-m", "ublkshell", "crashtest", "--workdir", str(work), "--size", "32M",
                          "--", "sleep", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    def mounted():
        with open("/proc/mounts") as f:
            return any(str(work) in line for line in f)
    deadline = time.monotonic() + 60
    while not mounted() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # the workload starts right after the mount
    assert mounted(), "the workload never started"
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "Traceback" not in err, err
    assert not list(work.iterdir()), "a killed crashtest left files behind"
