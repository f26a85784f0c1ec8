"""Names for the numbers in the ublk UAPI (the numbers come from native/uapi.h)."""
from .._native import lib

FEATURES = {
    "zero_copy": lib.UBLK_F_SUPPORT_ZERO_COPY,
    "uring_cmd_comp_in_task": lib.UBLK_F_URING_CMD_COMP_IN_TASK,
    "need_get_data": lib.UBLK_F_NEED_GET_DATA,
    "user_recovery": lib.UBLK_F_USER_RECOVERY,
    "user_recovery_reissue": lib.UBLK_F_USER_RECOVERY_REISSUE,
    "unprivileged_dev": lib.UBLK_F_UNPRIVILEGED_DEV,
    "cmd_ioctl_encode": lib.UBLK_F_CMD_IOCTL_ENCODE,
    "user_copy": lib.UBLK_F_USER_COPY,
    "zoned": lib.UBLK_F_ZONED,
    "user_recovery_fail_io": lib.UBLK_F_USER_RECOVERY_FAIL_IO,
    "update_size": lib.UBLK_F_UPDATE_SIZE,
    "auto_buf_reg": lib.UBLK_F_AUTO_BUF_REG,
    "quiesce": lib.UBLK_F_QUIESCE,
    "per_io_daemon": lib.UBLK_F_PER_IO_DAEMON,
    "buf_reg_off_daemon": lib.UBLK_F_BUF_REG_OFF_DAEMON,
    "batch_io": lib.UBLK_F_BATCH_IO,
    "integrity": lib.UBLK_F_INTEGRITY,
    "safe_stop_dev": lib.UBLK_F_SAFE_STOP_DEV,
    "no_auto_part_scan": lib.UBLK_F_NO_AUTO_PART_SCAN,
    "shmem_zc": lib.UBLK_F_SHMEM_ZC,
    "io_desc_size": lib.UBLK_F_IO_DESC_SIZE,
}

FEATURE_HELP = {
    "zero_copy": "register request buffers in io_uring (UBLK_U_IO_REGISTER_IO_BUF)",
    "uring_cmd_comp_in_task": "complete commands from task work",
    "need_get_data": "server supplies write buffers on demand",
    "user_recovery": "a new daemon can take over a device whose daemon died",
    "user_recovery_reissue": "recovery re-issues the IO the dead daemon held",
    "unprivileged_dev": "devices owned by unprivileged users",
    "cmd_ioctl_encode": "ioctl-encoded command numbers (UBLK_U_*)",
    "user_copy": "server copies data with pread/pwrite on /dev/ublkcN",
    "zoned": "zoned block devices",
    "user_recovery_fail_io": "recovery fails IO while no daemon serves it",
    "update_size": "resize a live device (UBLK_U_CMD_UPDATE_SIZE)",
    "auto_buf_reg": "request buffers registered automatically (zero copy)",
    "quiesce": "quiesce a live device (UBLK_U_CMD_QUIESCE_DEV)",
    "per_io_daemon": "any thread may serve any tag",
    "buf_reg_off_daemon": "buffer registration from any thread",
    "batch_io": "batched fetch/commit commands",
    "integrity": "integrity/metadata buffers",
    "safe_stop_dev": "stop only when nobody has the disk open",
    "no_auto_part_scan": "no partition scan on start",
    "shmem_zc": "zero copy through registered shared memory",
    "io_desc_size": "variable IO descriptor size",
}

STATES = {
    lib.UBLK_S_DEV_DEAD: "DEAD",
    lib.UBLK_S_DEV_LIVE: "LIVE",
    lib.UBLK_S_DEV_QUIESCED: "QUIESCED",
    lib.UBLK_S_DEV_FAIL_IO: "FAIL_IO",
}


def feature_names(mask: int) -> list[str]:
    names = [n for n, bit in FEATURES.items() if mask & bit]
    known = 0
    for bit in FEATURES.values():
        known |= bit
    rest = mask & ~known
    bit = 0
    while rest:
        if rest & 1:
            names.append(f"bit{bit}")
        rest >>= 1
        bit += 1
    return names
