"""The `--recovery` modes: what each asks of the kernel (ADD_DEV flags) and what a
device's flags mean. A leaf: targets, the daemon and `list` read it; recovery.py acts on it."""
from .._native import lib
from ..errors import UblkError, UsageError

# mode -> ADD_DEV flags (GET_FEATURES must offer every one of them)
MODES = {
    "requeue": lib.UBLK_F_USER_RECOVERY,
    "reissue": lib.UBLK_F_USER_RECOVERY | lib.UBLK_F_USER_RECOVERY_REISSUE,
    "fail": lib.UBLK_F_USER_RECOVERY | lib.UBLK_F_USER_RECOVERY_FAIL_IO,
}
DEFAULT_MODE = "requeue"
_FEATURE_NAMES = {lib.UBLK_F_USER_RECOVERY: "user_recovery",
                  lib.UBLK_F_USER_RECOVERY_REISSUE: "user_recovery_reissue",
                  lib.UBLK_F_USER_RECOVERY_FAIL_IO: "user_recovery_fail_io"}

def check_mode(mode) -> str | None:
    """`add --recovery` value -> mode name (None: no recovery)."""
    if mode is None or mode is False:
        return None
    if mode is True or mode == "":
        return DEFAULT_MODE
    if mode not in MODES:
        raise UsageError(f"--recovery: unknown mode {mode!r} (choose from {', '.join(MODES)})")
    return mode


def recovery_flags(mode, features: int) -> int:
    """ADD_DEV flags for a mode, if this kernel offers them (checked in the daemon)."""
    mode = check_mode(mode)
    if mode is None:
        return 0
    flags = MODES[mode]
    missing = [n for bit, n in _FEATURE_NAMES.items() if flags & bit and not features & bit]
    if missing:
        raise UblkError(f"--recovery={mode}: this kernel's ublk_drv does not offer "
                        f"{', '.join(missing)} (see `ublkshell features`)")
    # where offered, such a device can also hand over to a new daemon without a death (`upgrade`)
    return flags | (features & lib.UBLK_F_QUIESCE)


def recovery_mode(flags: int) -> str | None:
    """The mode a device's flags mean (None: no recovery)."""
    if not flags & lib.UBLK_F_USER_RECOVERY:
        return None
    if flags & lib.UBLK_F_USER_RECOVERY_FAIL_IO:
        return "fail"
    if flags & lib.UBLK_F_USER_RECOVERY_REISSUE:
        return "reissue"
    return "requeue"
