/* SPDX-License-Identifier: MIT */
/*
 * Where a ublk request's data lives while the target serves it.
 *
 * Copying (the default): the driver copies between the request's pages and
 * the tag's buffer in this process (io->buf) when the request arrives (WRITE)
 * and when it is committed (READ).
 *
 * Zero copy (UBLK_F_AUTO_BUF_REG): before handing a READ or WRITE over, the
 * driver registers the request's own pages in the queue ring's buffer table,
 * at the slot the tag's last command named (the tag itself), and unregisters
 * them at the commit. The target moves the data with READ_FIXED/WRITE_FIXED
 * on that slot (io->zc), so the bytes never pass through this process.
 *
 * Some IOs must see their data after all: a corrupt fault edits it, a target
 * computes it (null, pattern), the driver could not fill the slot
 * (UBLK_IO_F_NEED_REG_BUF), or an O_DIRECT store refused the client's
 * alignment. Those take the copy path (io->bounce): the device is added with
 * UBLK_F_USER_COPY as well, so a WRITE's data is read in with pread on
 * /dev/ublkcN before the target runs and a READ's data written out with
 * pwrite before the commit (never linked to it): one syscall where the
 * driver's copy took none.
 *
 * User copy alone (a zoned device: the driver accepts UBLK_F_ZONED only with
 * UBLK_F_USER_COPY): the driver copies nothing, so every WRITE's and
 * ZONE_APPEND's data is read in before the IO starts and every READ's data
 * (and a REPORT_ZONES answer) written out before the commit, by the same two
 * calls the copy path uses.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "ushell.h"

/* the file offset on /dev/ublkcN of a tag's data (UBLK_F_USER_COPY) */
static off_t user_copy_off(const struct us_queue *q, unsigned tag, unsigned off)
{
	return (off_t)(UBLKSRV_IO_BUF_OFFSET + ((uint64_t)q->q_id << UBLK_QID_OFF) +
		       ((uint64_t)tag << UBLK_TAG_OFF) + off);
}

void us_ublk_serve(struct us_queue *q, unsigned tag)
{
	const struct ublksrv_io_desc *iod = &q->iods[tag];
	struct us_io *io = &q->ios[tag];
	unsigned op = iod->op_flags & 0xff;

	io->op_flags = iod->op_flags;
	io->nr_sectors = iod->nr_sectors;
	io->start_sector = iod->start_sector;
	/* only requests that carry data are registered (FLUSH, DISCARD: nothing to move) */
	io->zc = q->dev->zc && (op == UBLK_IO_OP_READ || op == UBLK_IO_OP_WRITE);
	io->copy_err = 0;
	/*
	 * User copy: the data is in buf before the IO starts, as the driver's own
	 * copy would have put it, so faults (corrupt) and targets see it alike.
	 */
	if (q->dev->ucopy && (op == UBLK_IO_OP_WRITE || op == UBLK_IO_OP_ZONE_APPEND))
		io->copy_err = us_pread_full(q->dev->cfg.cdev_fd, io->buf, (size_t)io->nr_sectors << 9,
					     user_copy_off(q, tag, 0));
	us_io_start(q, tag);
}

int us_io_bounce(struct us_queue *q, unsigned tag, struct us_io *io)
{
	if (!io->zc)
		return 0;
	io->zc = 0;
	io->bounce = 1;
	q->ctr.copied++;
	if ((io->op_flags & 0xff) != UBLK_IO_OP_WRITE)
		return 0;
	return us_pread_full(q->dev->cfg.cdev_fd, io->buf, (size_t)io->nr_sectors << 9,
			     user_copy_off(q, tag, 0));
}

/* write len bytes of buf into the request's pages at off (a READ's data, or zeros) */
static int copy_out(struct us_queue *q, unsigned tag, const char *buf, size_t len, unsigned off)
{
	return us_pwrite_full(q->dev->cfg.cdev_fd, buf, len, user_copy_off(q, tag, off));
}

int us_io_copy_out(struct us_queue *q, unsigned tag, struct us_io *io, int result)
{
	unsigned op = io->op_flags & 0xff;

	/* a zone report goes up as a READ's data does (user copy only) */
	if (!(io->bounce || q->dev->ucopy) || result <= 0 ||
	    (op != UBLK_IO_OP_READ && op != UBLK_IO_OP_REPORT_ZONES))
		return result;
	int r = copy_out(q, tag, io->buf, (size_t)result, 0);

	if (r)
		return r;
	/*
	 * A zone report fills the entries asked for, but the kernel's buffer may
	 * be longer (its last chunk of a long report), and a count short of it
	 * leaves the request partly done and requeued for ever. Without a mapped
	 * buffer the driver clamps the count to the request's bytes: claim them all.
	 */
	return op == UBLK_IO_OP_REPORT_ZONES ? (int)q->dev->cfg.max_io_bytes : result;
}

int us_io_zero_tail(struct us_queue *q, unsigned tag, struct us_io *io, unsigned from, unsigned len)
{
	static const char zeros[65536];
	int r;

	if (!io->zc) {
		memset(io->buf + from, 0, len - from);
		return 0;
	}
	/* the request's pages are not ours to write: the driver copies zeros in */
	while (from < len) {
		unsigned n = len - from < sizeof(zeros) ? len - from : sizeof(zeros);

		r = copy_out(q, tag, zeros, n, from);
		if (r)
			return r;
		from += n;
	}
	return 0;
}

unsigned us_zc_slot(const struct us_queue *q, unsigned tag)
{
	/* --zero-copy fallback: past the table's end, so the driver's registration fails */
	return q->dev->cfg.zc_fallback ? tag + (unsigned)q->dev->cfg.depth : tag;
}

/* the sqe->addr of a FETCH or COMMIT_AND_FETCH (struct ublk_auto_buf_reg) */
uint64_t us_zc_cmd_addr(const struct us_queue *q, unsigned tag)
{
	/* a slot the driver cannot fill hands the request over flagged NEED_REG_BUF, not failed */
	return (uint64_t)us_zc_slot(q, tag) | (uint64_t)UBLK_AUTO_BUF_REG_FALLBACK << 16;
}

int us_zc_queue_init(struct us_queue *q)
{
	/* one slot per tag: slot = tag, on the ring that sends the tag's commands */
	return q->dev->zc ? io_uring_register_buffers_sparse(&q->ring, q->dev->cfg.depth) : 0;
}
