/* SPDX-License-Identifier: MIT */
/* null: completes at once; reads return zeros, writes are thrown away */
#include <string.h>

#include "ushell.h"

static int null_queue_io(struct us_queue *q, unsigned tag, struct us_io *io)
{
	unsigned len = io->nr_sectors << 9;

	(void)q; (void)tag;
	switch (io->op_flags & 0xff) {
	case UBLK_IO_OP_READ:
		/* the tag's buffer may still hold an earlier write's data */
		if (io->dirty) {
			memset(io->buf, 0, io->dirty);
			io->dirty = 0;
		}
		return len;
	case UBLK_IO_OP_WRITE:
		if (len > io->dirty)
			io->dirty = len;
		return len;
	case UBLK_IO_OP_FLUSH:
	case UBLK_IO_OP_DISCARD:
	case UBLK_IO_OP_WRITE_ZEROES:
		return 0;
	}
	return -EOPNOTSUPP;
}

const struct us_target_type us_target_null = {
	.info = {
		.name = "null",
		.help = "reads are zeros, writes are thrown away",
		.backing = US_BACKING_NONE,
		.options = US_OPT_SIZE,
		.sqes_per_io = 0,
	},
	.queue_io = null_queue_io,
};
