/* SPDX-License-Identifier: MIT */
/*
 * mem: RAM-backed and sparse. The data lives in a file on tmpfs (not in this
 * process) so it outlives a killed daemon and a recovered one finds it.
 * pread/pwrite rather than a mapping: a full tmpfs then fails the IO with
 * ENOSPC instead of killing the daemon with SIGBUS.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "ushell.h"

static int pread_whole(int fd, char *buf, size_t len, off_t off, int zeros_past_end)
{
	size_t done = 0;
	ssize_t n;

	while (done < len) {
		n = pread(fd, buf + done, len - done, off + done);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0) {
			if (!zeros_past_end)
				return -EIO;
			/* past the end of the file (a loop file smaller than the device) */
			memset(buf + done, 0, len - done);
			break;
		}
		done += n;
	}
	return 0;
}

int us_pread_zero(int fd, char *buf, size_t len, off_t off)
{
	return pread_whole(fd, buf, len, off, 1);
}

int us_pread_full(int fd, char *buf, size_t len, off_t off)
{
	return pread_whole(fd, buf, len, off, 0);
}

int us_pwrite_full(int fd, const char *buf, size_t len, off_t off)
{
	size_t done = 0;
	ssize_t n;

	while (done < len) {
		n = pwrite(fd, buf + done, len - done, off + done);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		done += n;
	}
	return 0;
}

static int mem_queue_io(struct us_queue *q, unsigned tag, struct us_io *io)
{
	int fd = q->dev->cfg.backing_fd;
	off_t off = (off_t)io->start_sector << 9;
	size_t len = (size_t)io->nr_sectors << 9;
	int r;

	/* zoned: every op through the zone state machine (zones.c); data in buf (user copy) */
	if (q->dev->tgt_data)
		return us_zones_io(q->dev->tgt_data, io->op_flags, io->start_sector, io->nr_sectors,
				   io->buf, q->dev->cfg.max_io_bytes, &io->append_lba);
	/* zero copy: the request's pages to or from the tmpfs file, through the ring as loop does */
	if (io->zc)
		return us_target_loop.queue_io(q, tag, io);
	switch (io->op_flags & 0xff) {
	case UBLK_IO_OP_READ:
		r = us_pread_zero(fd, io->buf, len, off);
		return r < 0 ? r : (int)len;
	case UBLK_IO_OP_WRITE:
		r = us_pwrite_full(fd, io->buf, len, off);
		return r < 0 ? r : (int)len;
	case UBLK_IO_OP_FLUSH:
		/* RAM has nothing to flush (a loop file on tmpfs comes through here too) */
		return 0;
	case UBLK_IO_OP_DISCARD:
	case UBLK_IO_OP_WRITE_ZEROES:
		/* a hole reads back as zeros and gives the memory back */
		if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len) < 0)
			return -errno;
		return 0;
	}
	return -EOPNOTSUPP;
}

static int mem_init(struct us_dev *d)
{
	const struct us_dev_cfg *c = &d->cfg;
	int err;

	if (c->backing_fd < 0)
		return -EINVAL;
	if (!c->zone_sectors)
		return 0;
	/* zoned: the driver moves no data itself then (user copy), which this path is written for */
	if (c->zone_fd < 0 || d->zc)
		return -EINVAL;
	d->tgt_data = us_zones_open(c->zone_fd, c->backing_fd, c->dev_bytes >> 9, c->zone_sectors,
				    c->zone_conv, c->zone_max_open, c->zone_max_active, &err);
	return d->tgt_data ? 0 : err;
}

static void mem_deinit(struct us_dev *d)
{
	us_zones_close(d->tgt_data);
}

const struct us_target_type us_target_mem = {
	.info = {
		.name = "mem",
		.help = "RAM (a sparse tmpfs file that outlives the daemon)",
		.backing = US_BACKING_MEM,
		.options = US_OPT_SIZE | US_OPT_ZONED,
		.flags = US_TGT_F_ZERO_COPY,
		/* the copying path serves in the thread; zero copy takes loop's one SQE */
		.sqes_per_io = 1,
	},
	.queue_io = mem_queue_io,
	.io_done = us_loop_io_done,
	.init = mem_init,
	.deinit = mem_deinit,
};
