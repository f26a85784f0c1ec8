"""The zone state machine (native/zones.c) through cffi, without a device: write-pointer
rules, conditions, open/active limits, report layout, and adopting the state file a
killed daemon left (recovery). Plus `add --zoned` validation and params encoding."""
import errno
import os
import struct

import pytest

from ublkshell._native import ffi, lib
from ublkshell.devices.targets import build_spec, make_target
from ublkshell.errors import UsageError

ZS = 2048  # 1 MiB zones, in sectors
NR = 8
EMPTY, IMP, EXP, CLOSED, FULL, NOT_WP = 1, 2, 3, 4, 14, 0


class Zones:
    def __init__(self, tmp_path, conv=1, max_open=0, max_active=0, name="d"):
        self.data = os.open(tmp_path / f"{name}.mem", os.O_RDWR | os.O_CREAT)
        os.ftruncate(self.data, NR * ZS * 512)
        self.state_path = tmp_path / f"{name}.zones"
        self.state = os.open(self.state_path, os.O_RDWR | os.O_CREAT)
        os.ftruncate(self.state, lib.us_zones_file_size(NR))
        self.geom = (conv, max_open, max_active)
        self.zs = self._open()
        self.buf = ffi.new("char[]", 1 << 20)
        self.lba = ffi.new("uint64_t *")

    def _open(self):
        err = ffi.new("int *")
        zs = lib.us_zones_open(self.state, self.data, NR * ZS, ZS, *self.geom, err)
        if zs == ffi.NULL:
            raise OSError(-err[0], os.strerror(-err[0]))
        return zs

    def reopen(self):
        """What a recovering daemon does: the same files, a new state machine."""
        lib.us_zones_close(self.zs)
        self.zs = self._open()

    def io(self, op, sector, nr=0, data=b""):
        if data:
            ffi.memmove(self.buf, data, len(data))
            nr = len(data) >> 9
        return lib.us_zones_io(self.zs, op, sector, nr, self.buf, len(self.buf), self.lba)

    def write(self, sector, data):
        return self.io(lib.UBLK_IO_OP_WRITE, sector, data=data)

    def read(self, sector, nbytes):
        r = self.io(lib.UBLK_IO_OP_READ, sector, nbytes >> 9)
        assert r == nbytes
        return ffi.buffer(self.buf, nbytes)[:]

    def report(self, sector=0, nr=NR):
        n = self.io(lib.UBLK_IO_OP_REPORT_ZONES, sector, nr)
        assert n == nr * 64, "every entry asked for, past the last zone zeroed"
        out = []
        for i in range(nr):
            start, length, wp, typ, cond = struct.unpack_from("<QQQBB", ffi.buffer(self.buf, n), i * 64)
            if length:
                out.append((start, wp, typ, cond))
        return out

    def cond(self, i):
        return self.report(i * ZS, 1)[0][3]

    def wp(self, i):
        return self.report(i * ZS, 1)[0][1]

    def close(self):
        lib.us_zones_close(self.zs)
        os.close(self.data)
        os.close(self.state)


@pytest.fixture
def z(tmp_path):
    zz = Zones(tmp_path)
    yield zz
    zz.close()


def test_fresh_report_layout(z):
    r = z.report()
    assert r[0] == (0, ZS, 1, NOT_WP), "conventional: no pointer (wp at its end)"
    assert all(r[i] == (i * ZS, i * ZS, 2, EMPTY) for i in range(1, NR))
    # past the last zone: zeroed entries (a zero length ends the kernel's walk)
    assert len(z.report(6 * ZS, 4)) == 2


def test_write_pointer_rules(z):
    d = os.urandom(8192)
    assert z.write(ZS + 16, d) == -errno.EIO, "not at the pointer"
    assert z.write(ZS, d) == len(d)
    assert (z.wp(1), z.cond(1)) == (ZS + 16, IMP)
    assert z.write(ZS, d) == -errno.EIO, "behind the pointer"
    assert z.write(ZS + 16, d) == len(d)
    # crossing into the next zone fails, even from the pointer
    z2 = os.urandom((ZS - 32 + 16) * 512)
    assert z.write(ZS + 32, z2[: (ZS - 32) * 512 + 512]) == -errno.EIO
    got = z.read(ZS, 32 * 512)
    assert got[:16384] == d + d and got[16384:] == bytes(len(got) - 16384)
    # filled to the end: full, no more writes
    assert z.write(ZS + 32, os.urandom((ZS - 32) * 512)) == (ZS - 32) * 512
    assert (z.wp(1), z.cond(1)) == (2 * ZS, FULL)
    assert z.write(2 * ZS - 8, bytes(4096)) == -errno.EIO


def test_conventional_zone_anywhere_no_append_no_mgmt(z):
    d = os.urandom(4096)
    assert z.write(100, d) == 4096 and z.read(100, 4096) == d
    assert z.io(lib.UBLK_IO_OP_ZONE_APPEND, 0, data=d) == -errno.EIO
    for op in (lib.UBLK_IO_OP_ZONE_OPEN, lib.UBLK_IO_OP_ZONE_RESET, lib.UBLK_IO_OP_ZONE_FINISH):
        assert z.io(op, 0) == -errno.EIO


def test_append_lands_at_pointer_and_says_where(z):
    d = os.urandom(4096)
    assert z.io(lib.UBLK_IO_OP_ZONE_APPEND, 2 * ZS, data=d) == 4096 and z.lba[0] == 2 * ZS
    assert z.io(lib.UBLK_IO_OP_ZONE_APPEND, 2 * ZS, data=d) == 4096 and z.lba[0] == 2 * ZS + 8
    assert z.io(lib.UBLK_IO_OP_ZONE_APPEND, 2 * ZS + 8, data=d) == -errno.EIO, "append names the zone start"
    assert z.read(2 * ZS, 8192) == d + d


def test_open_close_finish_reset(z):
    op = lib
    assert z.io(op.UBLK_IO_OP_ZONE_OPEN, 3 * ZS) == 0 and z.cond(3) == EXP
    assert z.io(op.UBLK_IO_OP_ZONE_CLOSE, 3 * ZS) == 0 and z.cond(3) == EMPTY, "no data: empty"
    assert z.io(op.UBLK_IO_OP_ZONE_CLOSE, 3 * ZS) == -errno.EIO
    z.write(3 * ZS, bytes(4096))
    assert z.io(op.UBLK_IO_OP_ZONE_CLOSE, 3 * ZS) == 0 and z.cond(3) == CLOSED
    assert z.write(3 * ZS + 8, b"\1" * 4096) == 4096 and z.cond(3) == IMP, "a write reopens"
    assert z.io(op.UBLK_IO_OP_ZONE_FINISH, 3 * ZS) == 0 and (z.cond(3), z.wp(3)) == (FULL, 4 * ZS)
    assert z.io(op.UBLK_IO_OP_ZONE_OPEN, 3 * ZS) == -errno.EIO, "a full zone does not open"
    assert z.io(op.UBLK_IO_OP_ZONE_RESET, 3 * ZS) == 0 and (z.cond(3), z.wp(3)) == (EMPTY, 3 * ZS)
    assert z.read(3 * ZS, 8192) == bytes(8192), "reset data reads as zeros"
    assert z.io(op.UBLK_IO_OP_ZONE_RESET, 3 * ZS + 8) == -errno.EIO, "not a zone start"
    for i in (1, 2, 5):
        z.write(i * ZS, bytes(512))
    assert z.io(op.UBLK_IO_OP_ZONE_RESET_ALL, 0) == 0
    assert all(c == EMPTY for _, _, _, c in z.report()[1:])


def test_open_and_active_limits(tmp_path):
    z = Zones(tmp_path, conv=0, max_open=2, max_active=3)
    try:
        op = lib
        assert z.io(op.UBLK_IO_OP_ZONE_OPEN, 0) == 0
        assert z.io(op.UBLK_IO_OP_ZONE_OPEN, ZS) == 0
        assert z.io(op.UBLK_IO_OP_ZONE_OPEN, 2 * ZS) == -errno.ETOOMANYREFS, "open limit"
        assert z.write(2 * ZS, bytes(512)) == -errno.ETOOMANYREFS, "explicitly open zones stay open"
        z.write(0, bytes(512))
        assert z.io(op.UBLK_IO_OP_ZONE_CLOSE, 0) == 0 and z.cond(0) == CLOSED
        # an implicit open may close another implicitly open zone to make room
        assert z.write(2 * ZS, bytes(512)) == 512 and z.cond(2) == IMP
        z.write(ZS, bytes(512))
        assert z.io(op.UBLK_IO_OP_ZONE_CLOSE, ZS) == 0
        # three active (0, 1 closed, 2 open): a fourth empty zone cannot start
        assert z.write(3 * ZS, bytes(512)) == -errno.EOVERFLOW
        assert z.io(op.UBLK_IO_OP_ZONE_FINISH, 4 * ZS) == -errno.EOVERFLOW
        assert z.io(op.UBLK_IO_OP_ZONE_FINISH, 0) == 0, "finishing gives its resources back"
        assert z.write(3 * ZS, bytes(512)) == 512
    finally:
        z.close()


def test_state_survives_reopen_and_bad_files_are_refused(tmp_path):
    z = Zones(tmp_path)
    try:
        z.write(ZS, bytes(4096))
        z.io(lib.UBLK_IO_OP_ZONE_OPEN, 2 * ZS)
        z.io(lib.UBLK_IO_OP_ZONE_FINISH, 3 * ZS)
        before = z.report()
        z.reopen()
        assert z.report() == before
        # another geometry than the file's: refused, not reinterpreted
        z.geom = (2, 0, 0)
        with pytest.raises(OSError) as e:
            z.reopen()
        assert e.value.errno == errno.EINVAL
        z.geom = (1, 0, 0)
        z.zs = z._open()
        # a corrupt record (a pointer outside its zone) is refused too
        with open(z.state_path, "r+b") as f:
            f.seek(32 + 16 * 4)
            f.write(struct.pack("<Q", 99 * ZS))
        lib.us_zones_close(z.zs)
        with pytest.raises(OSError):
            z.zs = z._open()
        z.zs = ffi.NULL
    finally:
        if z.zs != ffi.NULL:
            lib.us_zones_close(z.zs)
        os.close(z.data)
        os.close(z.state)


def spec(**kw):
    args = dict(size="256M", zoned=True, zone_size="16M")
    args.update(kw)
    return build_spec("mem", **args)


@pytest.mark.parametrize("kw,msg", [
    (dict(zone_size="3M"), "--zone-size: 3M is not a power of two"),
    (dict(size="100M"), "--size: 100M is not a multiple of the zone size (16M)"),
    (dict(conv_zones=16), "--conv-zones: 16 leaves no sequential zone"),
    (dict(max_open=8, max_active=4), "--max-open: 8 is more than --max-active 4"),
    (dict(max_open=15), "--max-open: 15 is more than the 14 sequential zones"[:33]),
    (dict(zone_size="2T"), "--zone-size: 2T is out of range"),
    (dict(zone_size="0"), "--zone-size: the size must be greater than zero"),
    (dict(size="1T", zone_size="64k"), "more than 1048576: use larger zones"),
    (dict(zero_copy="on"), "--zero-copy on:"),
    (dict(powercut=True), "--powercut"),
    (dict(zoned=False), "--zone-size is for zoned devices: add --zoned"),
])
def test_add_zoned_validation(kw, msg):
    if "max_open" in kw and "max_active" not in kw:
        kw["conv_zones"] = 2
    with pytest.raises(UsageError) as e:
        spec(**kw)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_add_zoned_other_targets_and_cli_bounds():
    with pytest.raises(UsageError, match="the null target has no zones"):
        build_spec("null", size="1G", zoned=True)
    from ublkshell.validate import check
    from ublkshell.verbs import ADD_ARGS
    for word, value in (("max_open", 0), ("max_active", -1), ("conv_zones", 10**30)):
        with pytest.raises(UsageError, match="out of range"):
            check("add", ADD_ARGS, {"target": "mem", word: value})


def test_params_encoding():
    s = spec(conv_zones=2, max_open=4, max_active=6)
    assert s["zoned"] == {"zone_size": 16 << 20, "conv_zones": 2, "max_open": 4, "max_active": 6}
    t = make_target(s)
    t.open()
    p = ffi.new("struct ublk_params *")
    t.fill_params(p, 512 << 10)
    assert p.types == lib.UBLK_PARAM_TYPE_BASIC | lib.UBLK_PARAM_TYPE_ZONED, "no discard on a zoned device"
    assert (p.basic.chunk_sectors, p.basic.dev_sectors) == (32768, 256 << 11)
    assert (p.zoned.max_open_zones, p.zoned.max_active_zones, p.zoned.max_zone_append_sectors) == (4, 6, 1024)
    assert t.dev_flags(lib.UBLK_F_ZONED | lib.UBLK_F_USER_COPY) == lib.UBLK_F_ZONED | lib.UBLK_F_USER_COPY
    from ublkshell.errors import UblkError
    with pytest.raises(UblkError, match="does not offer UBLK_F_ZONED"):
        t.dev_flags(lib.UBLK_F_USER_COPY)
    assert make_target(spec(zoned=False, zone_size=None)).dev_flags(0) == 0


def test_zone_ops_are_named():
    from ublkshell.faults.grammar import parse
    from ublkshell.observe.names import op_name
    assert op_name(lib.UBLK_IO_OP_ZONE_APPEND) == "zone_append"
    assert op_name(lib.UBLK_IO_OP_REPORT_ZONES) == "report_zones"
    (rule,) = parse("fail op=zone_reset,zone_finish")
    assert rule["ops"] == ["zone_finish", "zone_reset"]


def test_a_rule_on_a_zone_op_matches_that_op_only(tmp_path, monkeypatch):
    from ublkshell.faults import grammar, table
    from ublkshell.observe import shm as shm_mod
    monkeypatch.setenv("UBLKSHELL_DATA_DIR", str(tmp_path))
    s = shm_mod.create(13, nr_queues=1, depth=4, records=16, pid=os.getpid())
    try:
        (r,) = table.add(13, "fail op=zone_reset,zone_append")

        def ev(op):
            return grammar.fault_label(lib.us_fault_eval(s.base, 0, 0, op, 2048, 0))
        assert ev(lib.UBLK_IO_OP_ZONE_RESET) == ev(lib.UBLK_IO_OP_ZONE_APPEND) == f"fail#{r['id']}"
        assert ev(lib.UBLK_IO_OP_ZONE_FINISH) == ev(lib.UBLK_IO_OP_WRITE) == ""
    finally:
        s.close()
