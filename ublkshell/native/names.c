/* SPDX-License-Identifier: MIT */
/*
 * The names readers show for the codes records.h, faults.h and uapi.h define:
 * the one place they are spelled. Python reads them through the functions
 * below (observe/names.py), so every face shows and accepts the same words.
 */
#include "ushell.h"

static const struct {
	int		code;	/* UBLK_IO_OP_*, -1: every op the others do not name */
	const char	*name;
} op_table[US_NR_OPS] = {
	{ UBLK_IO_OP_READ, "read" },
	{ UBLK_IO_OP_WRITE, "write" },
	{ UBLK_IO_OP_FLUSH, "flush" },
	{ UBLK_IO_OP_DISCARD, "discard" },
	{ UBLK_IO_OP_WRITE_ZEROES, "write_zeroes" },
	[US_OP_OTHER] = { -1, "other" },
};

/* ops without a counter slot of their own (counted as "other"), named in records and rules */
static const struct {
	int		code;
	const char	*name;
} zone_op_table[] = {
	{ UBLK_IO_OP_ZONE_OPEN, "zone_open" },
	{ UBLK_IO_OP_ZONE_CLOSE, "zone_close" },
	{ UBLK_IO_OP_ZONE_FINISH, "zone_finish" },
	{ UBLK_IO_OP_ZONE_APPEND, "zone_append" },
	{ UBLK_IO_OP_ZONE_RESET_ALL, "zone_reset_all" },
	{ UBLK_IO_OP_ZONE_RESET, "zone_reset" },
	{ UBLK_IO_OP_REPORT_ZONES, "report_zones" },
};

static const struct {
	uint32_t	bit;
	const char	*name;
} flag_table[] = {
	{ UBLK_IO_F_FUA, "fua" },
	{ UBLK_IO_F_NOUNMAP, "nounmap" },
	{ UBLK_IO_F_FAILFAST_DEV, "failfast" },
	{ UBLK_IO_F_META, "meta" },
	{ UBLK_IO_F_SWAP, "swap" },
};

static const char *const action_table[] = {
	[US_FA_DELAY] = "delay",
	[US_FA_FAIL] = "fail",
	[US_FA_DROP] = "drop",
	[US_FA_CORRUPT] = "corrupt",
	[US_FA_TORN] = "torn",
	[US_FA_HANG] = "hang",
	[US_FA_FLAKEY] = "flakey",
	[US_FA_BAD] = "badblocks",
};

#define NELEM(a) ((int)(sizeof(a) / sizeof((a)[0])))

const char *us_op_name(int idx)
{
	return idx >= 0 && idx < US_NR_OPS ? op_table[idx].name : NULL;
}

int us_op_code(int idx)
{
	return idx >= 0 && idx < US_NR_OPS ? op_table[idx].code : -1;
}

const char *us_op_code_name(int code)
{
	int i;

	for (i = 0; i < US_OP_OTHER; i++)
		if (op_table[i].code == code)
			return op_table[i].name;
	for (i = 0; i < NELEM(zone_op_table); i++)
		if (zone_op_table[i].code == code)
			return zone_op_table[i].name;
	return NULL;
}

const char *us_io_flag_name(int i)
{
	return i >= 0 && i < NELEM(flag_table) ? flag_table[i].name : NULL;
}

uint32_t us_io_flag_bit(int i)
{
	return i >= 0 && i < NELEM(flag_table) ? flag_table[i].bit : 0;
}

const char *us_fault_action_name(uint32_t action)
{
	return action < (uint32_t)NELEM(action_table) ? action_table[action] : NULL;
}

/* the counter slot of a request's op (records.h: US_OP_*) */
int us_op_index(uint32_t op_flags)
{
	int op = op_flags & 0xff, i;

	for (i = 0; i < US_OP_OTHER; i++)
		if (op_table[i].code == op)
			return i;
	return US_OP_OTHER;
}

