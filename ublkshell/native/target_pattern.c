/* SPDX-License-Identifier: MIT */
/*
 * pattern: a read-only disk whose every 8-byte word holds its own byte offset,
 * big-endian (nbdkit's pattern plugin), so any misplaced or stale read shows
 * where its data came from. Nothing is stored: writes, discards and
 * write-zeroes fail with EROFS (the device is announced read-only too).
 */
#include <endian.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>

#include "ushell.h"

static int pattern_queue_io(struct us_queue *q, unsigned tag, struct us_io *io)
{
	uint64_t off = io->start_sector << 9, i;
	unsigned len = io->nr_sectors << 9;

	(void)q; (void)tag;
	switch (io->op_flags & 0xff) {
	case UBLK_IO_OP_READ:
		/* sectors are 512 bytes, so every IO starts and ends on a word */
		for (i = 0; i < len; i += 8) {
			uint64_t be = htobe64(off + i);

			memcpy(io->buf + i, &be, 8);
		}
		return (int)len;
	case UBLK_IO_OP_FLUSH:
		return 0;
	}
	return -EROFS;
}

const struct us_target_type us_target_pattern = {
	.info = {
		.name = "pattern",
		.help = "read-only; every 8-byte word reads as its own byte offset (big-endian)",
		.backing = US_BACKING_NONE,
		.options = US_OPT_SIZE,
		.flags = US_TGT_F_READ_ONLY,
		.sqes_per_io = 0,
	},
	.queue_io = pattern_queue_io,
};
