"""Recovery without a driver: modes and flags, what the verbs print, the shell's
completion, and a recovering daemon taking over its predecessor's statistics."""
import os

import pytest

from ublkshell._native import lib
from ublkshell.devices import paths
from ublkshell.observe import shm as shm_mod
from ublkshell.errors import UblkError, UsageError
from ublkshell.devices.recovery import render_kill, render_recover
from ublkshell.devices.recovery_modes import check_mode, recovery_flags, recovery_mode
from ublkshell.devices.targets import build_spec
from ublkshell.observe.render import render_add, render_list

REC, REISSUE, FAIL = lib.UBLK_F_USER_RECOVERY, lib.UBLK_F_USER_RECOVERY_REISSUE, lib.UBLK_F_USER_RECOVERY_FAIL_IO


@pytest.mark.parametrize("given,mode", [(None, None), (False, None), (True, "requeue"), ("", "requeue"),
                                        ("requeue", "requeue"), ("reissue", "reissue"), ("fail", "fail")])
def test_modes(given, mode):
    assert check_mode(given) == mode
    spec = build_spec("mem", size="16M", recovery=given)
    assert spec.get("recovery") == mode


def test_bad_mode_is_a_usage_error():
    with pytest.raises(UsageError, match=r"^--recovery: unknown mode 'Requeue' \(choose from requeue, reissue, fail\)$"):
        build_spec("mem", size="16M", recovery="Requeue")


def test_flags_round_trip_and_need_the_kernel_to_offer_them():
    every = REC | REISSUE | FAIL
    for mode, flags in (("requeue", REC), ("reissue", REC | REISSUE), ("fail", REC | FAIL)):
        assert recovery_flags(mode, every) == flags
        assert recovery_mode(flags | lib.UBLK_F_CMD_IOCTL_ENCODE) == mode
    assert recovery_flags(None, 0) == 0 and recovery_mode(lib.UBLK_F_CMD_IOCTL_ENCODE) is None
    with pytest.raises(UblkError, match=r"^--recovery=reissue: this kernel's ublk_drv does not offer "
                                        r"user_recovery_reissue \(see `ublkshell features`\)$"):
        recovery_flags("reissue", REC | FAIL)
    with pytest.raises(UblkError, match="does not offer user_recovery, user_recovery_fail_io"):
        recovery_flags("fail", 0)


def _dev(i, state, alive, recovery=None):
    return {"id": i, "state": state, "size": 1 << 20, "queues": 1, "depth": 8, "pid": 100 + i,
            "daemon_alive": alive, "target": "mem", "flags": [], "recovery": recovery}


def test_list_says_what_each_dead_daemon_means():
    text = render_list([_dev(0, "LIVE", True), _dev(1, "QUIESCED", False, "requeue"),
                        _dev(2, "FAIL_IO", False, "fail"), _dev(3, "DEAD", False)])
    notes = text.splitlines()[5:]
    assert notes == [
        "† dev 1: daemon gone (QUIESCED): IO waits until `recover 1` starts a new daemon (or `del 1` fails it)",
        "† dev 2: daemon gone (FAIL_IO): IO fails (EREMOTEIO) until `recover 2` starts a new daemon",
        "† dev 3: daemon gone (DEAD): IO fails until the device is deleted (`ublkshell del 3`)"]
    assert " 101†" in text and "QUIESCED" in text
    assert "†" not in render_list([_dev(0, "LIVE", True)])


def test_renders():
    k = {"id": 3, "pid": 77, "daemon_gone": True, "state": "QUIESCED", "recovery": "requeue", "seconds": 0.4}
    assert render_kill(k) == "dev 3: daemon 77 killed; device QUIESCED: IO waits for `recover 3`"
    assert render_kill(dict(k, state="DEAD", recovery=None)).endswith(
        "device DEAD: IO in flight failed, the disk is gone; `del 3` removes the rest")
    assert render_kill(dict(k, daemon_gone=False)) == "dev 3: daemon 77 killed, but it has not exited yet"
    r = {"id": 3, "pid": 80, "old_pid": 77, "recoveries": 2, "seconds": 1.23, "abandoned": 1}
    assert render_recover(r) == ("dev 3: recovered by daemon 80 (was 77), recovery #2, 1.2 s; "
                                 "1 IOs were being served when it died")
    add = {"id": 3, "describe": "mem", "size": 1 << 30, "queues": 2, "depth": 64, "recovery": "reissue"}
    assert render_add(add) == "dev 3 -> /dev/ublkb3 (mem, 1G, 2 queues x 64, recovery reissue)"


def test_completion(monkeypatch):
    from ublkshell.repl.completion import candidates
    from ublkshell.repl.shell import Shell

    sh = Shell("/nonexistent.sock")
    monkeypatch.setattr(sh, "device_ids", lambda: [0, 7])
    assert candidates(sh, [], "k") == ["kill"] and candidates(sh, [], "reco") == ["recover"]
    assert candidates(sh, ["kill"], "") == ["0", "7"] and candidates(sh, ["recover"], "7") == ["7"]
    assert candidates(sh, ["kill", "7"], "") == []
    assert candidates(sh, ["add", "-t", "mem"], "--reco") == ["--recovery"]
    assert candidates(sh, ["add", "--recovery"], "re") == ["requeue", "reissue"]
    assert candidates(sh, ["add", "--recovery"], "--s") == ["--size"]
    assert candidates(sh, ["add"], "--recovery=f") == ["--recovery=fail"]
    help_text = sh.help(None)
    assert "kill" in help_text and "recover" in help_text
    assert "START_USER_RECOVERY" in sh.help("recover")


@pytest.fixture
def shm_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("UBLKSHELL_DATA_DIR", str(tmp_path))
    return tmp_path


def test_adopt_keeps_counters_and_forgets_the_dead_daemons_tags(shm_dir):
    s = shm_mod.create(5, nr_queues=2, depth=16, records=16, pid=111)
    for i in range(10):
        lib.us_shm_record_io(s.base, i % 2, i, lib.UBLK_IO_OP_WRITE, i * 8, 8, 4096, 1000)
    # the dead daemon was serving two tags
    for q, t in ((0, 3), (1, 9)):
        lib.us_shm_tags(s.base, q)[t].state = 1
        s.queue(q).inflight += 1
    lib.us_fault_area_of(s.base).hung = 1
    ino, head = os.stat(s.path).st_ino, lib.us_rec_head(s.base, 0)
    s.close()

    a, abandoned = shm_mod.adopt(5, 2, 16, pid=222)
    assert abandoned == 2 and os.stat(a.path).st_ino == ino
    assert int(a.hdr.daemon_pid) == 222
    assert sum(int(a.op_stats(q, 1).ios) for q in range(2)) == 10
    assert lib.us_rec_head(a.base, 0) == head  # the trace's cursors stay valid
    assert all(int(a.queue(q).inflight) == 0 for q in range(2))
    assert not any(lib.us_shm_tags(a.base, q)[t].state for q in range(2) for t in range(16))
    assert int(lib.us_fault_area_of(a.base).hung) == 0
    a.close()


def test_adopt_refuses_another_layout_or_no_file(shm_dir):
    shm_mod.create(6, nr_queues=1, depth=16, records=16, pid=1).close()
    assert shm_mod.adopt(6, 1, 32, pid=2) == (None, 0)
    assert shm_mod.adopt(6, 2, 16, pid=2) == (None, 0)
    assert shm_mod.adopt(99, 1, 16, pid=2) == (None, 0)
    with open(paths.stats_path(7), "wb") as f:
        f.write(b"\0" * 4096)  # not statistics at all
    assert shm_mod.adopt(7, 1, 16, pid=2) == (None, 0)


def test_a_killed_daemon_is_ours_until_it_has_exited(monkeypatch):
    """A SIGKILLed daemon releases its memory first (its /proc cmdline then reads empty) and
    tears down its rings and /dev/ublkcN after that: until it has exited, `kill` waits for it
    and `recover` must not take it for some other program serving the device (the soak run
    hit this at its eleventh kill)."""
    import subprocess
    import sys
    import time
    from types import SimpleNamespace

    from ublkshell import procs
    from ublkshell.devices import recovery

    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "ublkshell.bridge.daemon"])
    try:
        deadline = time.monotonic() + 10
        while not procs.is_daemon(p.pid) and time.monotonic() < deadline:
            time.sleep(0.01)  # until it has exec'd
        start = procs.start_time(p.pid)
        info = SimpleNamespace(ublksrv_pid=p.pid)
        assert procs.is_daemon(p.pid, start) and recovery._foreign_server(info) == 0
        monkeypatch.setattr(procs, "_cmdline", lambda pid: [b""])  # what /proc shows while it exits
        assert not procs.is_daemon(p.pid, start)
        assert procs.same_process(p.pid, start)  # kill keeps waiting for it
        assert recovery._foreign_server(info) == 0  # and recover does not call it someone else's
        monkeypatch.setattr(procs, "_cmdline", lambda pid: [b"/usr/bin/other-ublk-server", b""])
        assert recovery._foreign_server(info) == p.pid
    finally:
        p.kill()
        p.wait()
    assert not procs.same_process(p.pid, start)
