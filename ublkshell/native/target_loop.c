/* SPDX-License-Identifier: MIT */
/*
 * loop: a file or block device, through io_uring on the queue's own ring.
 * FLUSH -> fdatasync, FUA -> RWF_DSYNC on the write, DISCARD -> punch a hole
 * (zero range where the store cannot punch: the FUSE front end's punch must read zeros),
 * WRITE_ZEROES -> zero range (punch when the request allows unmapping).
 * Reads at or past the backing file's end return zeros. Files on tmpfs are
 * served synchronously in the queue thread, unless the device is zero copy:
 * then every READ and WRITE goes through the ring on the request's own pages.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <linux/fs.h>

#include "ushell.h"

#ifndef RWF_DSYNC
#define RWF_DSYNC 0x00000002
#endif

static int loop_submit(struct us_queue *q, unsigned tag, struct us_io *io)
{
	int fd = q->dev->cfg.backing_fd;
	uint64_t off = (io->start_sector << 9) + io->done;
	unsigned len = (io->nr_sectors << 9) - io->done;
	unsigned op = io->op_flags & 0xff;
	struct io_uring_sqe *sqe;
	int mode, link;

	/*
	 * The first try of an IO that cannot come back short carries its commit
	 * linked behind it: one io_uring_enter per IO instead of two. A chain must
	 * not be split across submissions, so make room for both SQEs first.
	 */
	link = !io->done && !io->attempt && !io->fh.nolink && op <= UBLK_IO_OP_WRITE_ZEROES && op != UBLK_IO_OP_WRITE_SAME &&
		(op != UBLK_IO_OP_READ || (off + len <= q->dev->cfg.backing_bytes && !io->bounce));
	if (link && io_uring_sq_space_left(&q->ring) < 2)
		io_uring_submit(&q->ring);
	sqe = us_get_sqe(q);
	if (!sqe)
		return -EBUSY;
	switch (op) {
	case UBLK_IO_OP_READ:
		if (io->zc)
			/* the request's pages, registered at slot tag; addr is the offset into them */
			io_uring_prep_read_fixed(sqe, fd, (void *)(uintptr_t)io->done, len, off,
						 us_zc_slot(q, tag));
		else
			io_uring_prep_read(sqe, fd, io->buf + io->done, len, off);
		break;
	case UBLK_IO_OP_WRITE:
		if (io->zc)
			io_uring_prep_write_fixed(sqe, fd, (void *)(uintptr_t)io->done, len, off,
						  us_zc_slot(q, tag));
		else
			io_uring_prep_write(sqe, fd, io->buf + io->done, len, off);
		if (io->op_flags & UBLK_IO_F_FUA)
			sqe->rw_flags = RWF_DSYNC;
		break;
	case UBLK_IO_OP_FLUSH:
		io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
		break;
	case UBLK_IO_OP_DISCARD:
		/* attempt 1: the store cannot punch; zeroing keeps a discarded range from reading stale */
		io_uring_prep_fallocate(sqe, fd, (io->attempt ? FALLOC_FL_ZERO_RANGE : FALLOC_FL_PUNCH_HOLE) |
					FALLOC_FL_KEEP_SIZE, off, len);
		break;
	case UBLK_IO_OP_WRITE_ZEROES:
		/* attempt 0 follows the request's wish, attempt 1 tries the other way */
		mode = !!(io->op_flags & UBLK_IO_F_NOUNMAP) ^ !!io->attempt ?
			FALLOC_FL_ZERO_RANGE : FALLOC_FL_PUNCH_HOLE;
		io_uring_prep_fallocate(sqe, fd, mode | FALLOC_FL_KEEP_SIZE, off, len);
		break;
	default:
		/* the SQE is already taken: turn it into a no-op that reports the error */
		io_uring_prep_nop(sqe);
		io->attempt = 0xff;
		sqe->user_data = us_ud(tag, UD_TGT);
		q->tgt_inflight++;
		return US_QUEUED;
	}
	us_sqe_set_fd(q, sqe, US_FIXED_BACKING);
	sqe->user_data = us_ud(tag, UD_TGT);
	q->tgt_inflight++;
	if (link)
		us_link_commit(q, tag, sqe, op <= UBLK_IO_OP_WRITE ? (int)len : 0);
	return US_QUEUED;
}

static int loop_init(struct us_dev *d)
{
	return d->cfg.backing_fd >= 0 ? 0 : -EINVAL;
}

static int loop_queue_io(struct us_queue *q, unsigned tag, struct us_io *io)
{
	/*
	 * A file in RAM never waits for a device, and io_uring hands reads of
	 * tmpfs to a worker thread: copying right here is the short path (the
	 * mem target's code does exactly that on its own tmpfs file).
	 */
	if (q->dev->cfg.backing_in_memory && !io->zc)
		return us_target_mem.queue_io(q, tag, io);
	return loop_submit(q, tag, io);
}

int us_loop_io_done(struct us_queue *q, unsigned tag, struct us_io *io, int res)
{
	unsigned op = io->op_flags & 0xff;
	unsigned len = io->nr_sectors << 9;
	uint64_t off = io->start_sector << 9;

	if (io->attempt == 0xff)
		return -EOPNOTSUPP;
	if (res == -EAGAIN || res == -EINTR)
		return loop_submit(q, tag, io);
	if (res == -EINVAL && io->zc && !io->done) {
		/*
		 * An O_DIRECT backing refused the request's own pages (their alignment
		 * is the client's): move the data through our aligned buffer instead.
		 * Not after part of a READ has landed in the pages: the copy-out would
		 * write over it from a buffer that never held it.
		 */
		res = us_io_bounce(q, tag, io);
		return res ? res : loop_submit(q, tag, io);
	}

	switch (op) {
	case UBLK_IO_OP_READ:
		if (res < 0)
			return res;
		io->done += res;
		if (io->done < len && (res == 0 || off + io->done >= q->dev->cfg.backing_bytes)) {
			res = us_io_zero_tail(q, tag, io, io->done, len);
			if (res)
				return res;
			io->done = len;
		}
		return io->done < len ? loop_submit(q, tag, io) : (int)len;
	case UBLK_IO_OP_WRITE:
		if (res <= 0)
			return res < 0 ? res : -EIO;
		io->done += res;
		return io->done < len ? loop_submit(q, tag, io) : (int)len;
	case UBLK_IO_OP_DISCARD:
		if (res == -EOPNOTSUPP && !io->attempt) {
			io->attempt = 1;
			return loop_submit(q, tag, io);
		}
		/* discard is advisory: a store that can neither punch nor zero keeps the data */
		return res == -EOPNOTSUPP ? 0 : (res < 0 ? res : 0);
	case UBLK_IO_OP_WRITE_ZEROES:
		if (res == -EOPNOTSUPP && !io->attempt) {
			io->attempt = 1;
			return loop_submit(q, tag, io);
		}
		return res < 0 ? res : 0;
	}
	/* FLUSH, and every op that commits no byte count */
	return res < 0 ? res : 0;
}

const struct us_target_type us_target_loop = {
	.info = {
		.name = "loop",
		.help = "a file or block device (-f), through io_uring",
		.backing = US_BACKING_FILE,
		.options = US_OPT_FILE,
		.flags = US_TGT_F_ZERO_COPY,
		/* the IO; its linked commit is the front end's and counted there */
		.sqes_per_io = 1,
	},
	.init = loop_init,
	.queue_io = loop_queue_io,
	.io_done = us_loop_io_done,
};
