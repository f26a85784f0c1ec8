"""The names Python shows and accepts are the C side's: every op slot, IO flag and
fault action the headers define has its name from records.c, and the two views agree
both ways."""
import pytest

from ublkshell._native import ffi, lib
from ublkshell import commands
from ublkshell.faults import grammar
from ublkshell.observe import names
from ublkshell.observe import shm as shm_mod
from ublkshell.observe.stats import snapshot
from ublkshell.observe.trace import Filter, format_record


def test_every_op_slot_has_a_name_and_the_ublk_op_it_counts():
    assert len(names.OPS) == lib.US_NR_OPS and len(set(names.OPS)) == lib.US_NR_OPS
    assert names.OPS[lib.US_OP_OTHER] == "other" and lib.us_op_code(lib.US_OP_OTHER) == -1
    uapi = {lib.UBLK_IO_OP_READ, lib.UBLK_IO_OP_WRITE, lib.UBLK_IO_OP_FLUSH, lib.UBLK_IO_OP_DISCARD,
            lib.UBLK_IO_OP_WRITE_ZEROES}
    # zone ops are named too (records, rules) but counted in "other"
    zone = {lib.UBLK_IO_OP_ZONE_OPEN, lib.UBLK_IO_OP_ZONE_CLOSE, lib.UBLK_IO_OP_ZONE_FINISH,
            lib.UBLK_IO_OP_ZONE_APPEND, lib.UBLK_IO_OP_ZONE_RESET_ALL, lib.UBLK_IO_OP_ZONE_RESET,
            lib.UBLK_IO_OP_REPORT_ZONES}
    assert set(names.OP_NAMES) == uapi | zone
    assert {lib.us_op_code(i) for i in range(lib.US_OP_OTHER)} == uapi
    for name, code in names.OP_CODES.items():
        assert names.OP_NAMES[code] == name and names.op_name(code) == name
    assert lib.us_op_name(lib.US_NR_OPS) == ffi.NULL and lib.us_op_name(-1) == ffi.NULL
    assert names.op_name(0x42) == "op66"


def test_every_fault_action_has_a_name_and_round_trips():
    codes = [getattr(lib, n) for n in dir(lib) if n.startswith("US_FA_")]
    assert sorted(codes) == sorted(names.ACTION_NAMES)
    for code, name in names.ACTION_NAMES.items():
        assert names.ACTION_CODES[name] == code
        assert grammar.fault_label(code | 7 << 8) == f"{name}#7"
    assert lib.us_fault_action_name(0) == ffi.NULL
    assert lib.us_fault_action_name(max(codes) + 1) == ffi.NULL
    assert lib.us_fault_action_name(0xFFFFFFFF) == ffi.NULL
    # the grammar takes exactly these actions, each with help, and the CLI offers them all
    assert list(grammar.ACTIONS) == list(names.ACTION_CODES) and all(grammar.ACTIONS.values())
    assert set(names.ACTION_CODES) <= set(commands.FAULT_VERBS)


def test_every_flag_is_a_uapi_bit_with_a_name():
    bits = [bit for bit, _ in names.FLAG_NAMES]
    assert len(set(bits)) == len(bits) and all(bit and bit & (bit - 1) == 0 for bit in bits)
    assert {lib.UBLK_IO_F_FUA, lib.UBLK_IO_F_NOUNMAP, lib.UBLK_IO_F_FAILFAST_DEV} <= set(bits)
    assert names.flag_names(lib.UBLK_IO_F_FUA | lib.UBLK_IO_F_NOUNMAP) == ["fua", "nounmap"]


def test_limits_are_the_headers():
    assert grammar.MAX_QUEUES == lib.UBLK_MAX_NR_QUEUES and grammar.MAX_DEPTH == lib.UBLK_MAX_QUEUE_DEPTH
    assert grammar.MAX_RULES == lib.US_FAULT_SLOTS and grammar.MAX_LBA == lib.US_FAULT_MAX_LBA


@pytest.mark.parametrize("code", sorted(names.OP_NAMES) + [0x42])
def test_the_counter_slot_c_uses_is_the_one_python_names(tmp_path, monkeypatch, code):
    monkeypatch.setenv("UBLKSHELL_DATA_DIR", str(tmp_path))
    s = shm_mod.create(2, nr_queues=1, depth=4, records=16, pid=1)
    try:
        lib.us_shm_record_io(s.base, 0, 0, code, 0, 8, 0, 10)
        counted = [op for op, o in snapshot(s)["ops"].items() if o["ios"]]
        slot = names.OP_NAMES.get(code, "other")
        assert counted == [slot if slot in names.OPS else "other"]
    finally:
        s.close()


def test_every_face_takes_the_same_op_words():
    for op in names.IO_OPS:
        assert Filter.parse([f"op={op}"]).op == {op}
        assert grammar.parse(f"fail op={op}")[0]["ops"] == [op]
    r = {"t_ns": 0, "queue": 0, "tag": 0, "op": "flush", "flags": ["fua"], "sector": 0, "sectors": 0,
         "lat_ns": 1, "result": 0, "fault": names.fault_label(names.ACTION_CODES["delay"] | 1 << 8)}
    assert r["fault"] == "delay#1" and format_record(r).endswith(" delay#1")
