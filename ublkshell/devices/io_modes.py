"""How a device's requests and results cross to the kernel (`add --io-mode`).

per-tag: one FETCH per tag, each result back with that tag's COMMIT_AND_FETCH.
batch: UBLK_F_BATCH_IO: one multishot fetch brings many tags per completion,
one COMMIT_IO_CMDS takes back every result a ring turn produced. The kernel
takes only the protocol the device was added with, so the mode is fixed at
ADD_DEV and read back from the device's flags (a recovering daemon follows it).
"""
from .._native import lib
from ..errors import UblkError

IO_MODES = ("auto", "batch", "per-tag")
# `add --zero-copy`: the request's pages as the target's buffer (docs/design.md, "Zero copy");
# fallback: zero copy whose every registration fails, to exercise the driver's fallback path
ZERO_COPY_MODES = ("auto", "on", "off", "fallback")
# `add --coalesce`: the longest a busy queue waits for more completions
MAX_COALESCE_NS = 10_000_000


def io_mode_flags(mode: str, features: int, depth: int = 128) -> int:
    """The ADD_DEV flags for a mode, given what the kernel offers (GET_FEATURES) and the depth."""
    if mode == "per-tag":
        return 0
    if depth < 2:
        # the driver refuses batch IO on a queue of one tag (ADD_DEV: EINVAL)
        if mode == "batch":
            raise UblkError("--io-mode batch needs -d/--depth 2 or more (the driver refuses batch IO "
                            "on a queue of one tag); use --io-mode per-tag or auto")
        return 0
    if features & lib.UBLK_F_BATCH_IO:
        return lib.UBLK_F_BATCH_IO
    if mode == "batch":
        raise UblkError("--io-mode batch: this kernel's ublk_drv does not offer batch IO "
                        "(UBLK_F_BATCH_IO, Linux 6.19 and later); use --io-mode per-tag or auto")
    return 0


def io_mode_of(flags: int) -> str:
    """The mode a device was added with, from its flags."""
    return "batch" if flags & lib.UBLK_F_BATCH_IO else "per-tag"


def zero_copy_flags(mode: str, features: int, pays: bool) -> int:
    """The ADD_DEV flags for `--zero-copy`. UBLK_F_AUTO_BUF_REG registers each READ's and
    WRITE's pages with the queue's ring; UBLK_F_USER_COPY beside it is the copy path for
    the IOs whose data must pass through the daemon (a corrupt fault, a slot the kernel
    could not fill). auto: on where the target says it pays (loop on a file or device that
    is not in RAM) and the kernel offers both."""
    if mode == "off" or (mode == "auto" and not pays):
        return 0
    want = lib.UBLK_F_AUTO_BUF_REG | lib.UBLK_F_USER_COPY
    if features & want == want:
        return want
    if mode != "auto":
        raise UblkError(f"--zero-copy {mode}: this kernel's ublk_drv does not offer automatic buffer "
                        "registration with user copy (UBLK_F_AUTO_BUF_REG, Linux 6.16 and later); "
                        "use --zero-copy auto or off")
    return 0


def zero_copy_of(flags: int) -> bool:
    return bool(flags & lib.UBLK_F_AUTO_BUF_REG)
