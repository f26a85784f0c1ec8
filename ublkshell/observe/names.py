"""The names of what the C side numbers: IO ops, IO flags, fault actions, and the limits
the layouts hold. Read once from the native module (records.c's name tables, the
headers' constants), so no face spells a name or a bound the C side could change
without it."""
from .._native import ffi, lib


def _name(p) -> str | None:
    return None if p == ffi.NULL else ffi.string(p).decode()


# the per-op counter slots of records.h, in their order: read .. write_zeroes, other
OPS = tuple(_name(lib.us_op_name(i)) for i in range(lib.US_NR_OPS))
# ublk op code -> name, for the ops an IO can be named by (trace filters, rules' op=)
# (zone ops too: they count as "other" but records and rules name them)
OP_NAMES = {code: _name(lib.us_op_code_name(code)) for code in range(256)
            if lib.us_op_code_name(code) != ffi.NULL}
OP_CODES = {name: code for code, name in OP_NAMES.items()}
IO_OPS = tuple(OP_CODES)
# (UBLK_IO_F_* bit, name) of the flags a record's op_flags may carry
FLAG_NAMES = tuple((lib.us_io_flag_bit(i), _name(lib.us_io_flag_name(i)))
                   for i in range(32) if lib.us_io_flag_name(i) != ffi.NULL)
# fault action code (US_FA_*, the low byte of a record's fault field) -> name
ACTION_NAMES = {code: _name(lib.us_fault_action_name(code))
                for code in range(1, 256) if lib.us_fault_action_name(code) != ffi.NULL}
ACTION_CODES = {name: code for code, name in ACTION_NAMES.items()}

MAX_QUEUES = lib.UBLK_MAX_NR_QUEUES
MAX_DEPTH = lib.UBLK_MAX_QUEUE_DEPTH
FAULT_SLOTS = lib.US_FAULT_SLOTS
FAULT_MAX_LBA = lib.US_FAULT_MAX_LBA
FAULT_MAX_ID = lib.US_FAULT_MAX_ID
US_ZONES_MAX = lib.US_ZONES_MAX


def op_name(op_flags: int) -> str:
    op = op_flags & 0xFF
    return OP_NAMES.get(op, f"op{op}")


def flag_names(op_flags: int) -> list[str]:
    return [n for bit, n in FLAG_NAMES if op_flags & bit]


def action_name(code: int) -> str:
    return ACTION_NAMES.get(code, "?")


def fault_label(code: int) -> str:
    """A record's fault field (action | rule id << 8) -> `delay#3`."""
    if not code:
        return ""
    return f"{ACTION_NAMES.get(code & 0xff, '?')}#{code >> 8}"
