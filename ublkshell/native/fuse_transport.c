/* SPDX-License-Identifier: MIT */
/*
 * The FUSE front end: the targets on kernels without ublk_drv.
 *
 * The device is one regular file, "disk", at the root of a FUSE mount. Every
 * open gets FOPEN_DIRECT_IO, so each read and write of it (by the loop driver
 * when `losetup` attached it, or by anyone) reaches these handlers instead of
 * the page cache. fsync is FLUSH, fallocate(PUNCH_HOLE) is DISCARD and
 * fallocate(ZERO_RANGE) is WRITE_ZEROES: what the loop driver turns those
 * block requests into.
 *
 * The IO itself takes the ublk path's pipeline (pipeline.c) on a queue of
 * its own: one queue thread with its own io_uring serves `depth` tags, with
 * the same records, fault rules (delays and hangs on that ring), power-cut
 * log and targets. A FUSE worker thread takes a free tag, fills its us_io
 * (a write's data copied into the tag's buffer), hands the tag over (a list
 * and an eventfd the ring polls) and returns to reading requests; the queue
 * thread answers FUSE when the pipeline completes the tag (fuse_reply_* may
 * be called from any thread).
 *
 * IO is in whole 512-byte sectors, as a block device's: an offset or length
 * that is not a multiple of 512 gets EINVAL (the loop driver never sends
 * one). The disk cannot grow: a write starting at its end gets ENOSPC, a read
 * there is empty, and IO running past it is cut at it.
 *
 * Stopping (us_fuse_stop_io, on delete and power cut) ends every IO the queue
 * still holds, hung ones included, with EIO, as the ublk driver's abort does,
 * and any IO arriving later gets EIO at once.
 *
 * Longer than 400 lines: the tag hand-over, the queue thread and the request
 * handlers all work on one struct us_fuse under one lock; apart, each would
 * have to expose that lock's rules to the others.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 312
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "fuse_transport.h"

/* -- tags: workers take and hand over, the queue thread gives back ---------------- */
static int take_tag(struct us_fuse *f, unsigned *tag)
{
	pthread_mutex_lock(&f->lock);
	/* more requests than tags: the extra ones wait, as they would for a ublk tag */
	while (f->q_state == Q_SERVING && !f->nr_free)
		pthread_cond_wait(&f->cond, &f->lock);
	if (f->q_state != Q_SERVING) {
		pthread_mutex_unlock(&f->lock);
		return -EIO;
	}
	*tag = f->free_tags[--f->nr_free];
	f->nr_filling++;
	pthread_mutex_unlock(&f->lock);
	return 0;
}

static void put_tag_locked(struct us_fuse *f, unsigned tag)
{
	f->reqs[tag] = NULL;
	f->free_tags[f->nr_free++] = tag;
	/* one cond for tag waiters and the queue thread: a signal could wake the wrong one */
	pthread_cond_broadcast(&f->cond);
}

/* the tag's us_io is filled: the queue thread runs it from here */
static void hand_over(struct us_fuse *f, unsigned tag, fuse_req_t req)
{
	uint64_t one = 1;

	pthread_mutex_lock(&f->lock);
	if (!--f->nr_filling)
		pthread_cond_broadcast(&f->cond);
	if (f->q_state != Q_SERVING) {
		put_tag_locked(f, tag);
		pthread_mutex_unlock(&f->lock);
		fuse_reply_err(req, EIO);
		return;
	}
	f->reqs[tag] = req;
	f->handed[f->nr_handed++] = tag;
	pthread_mutex_unlock(&f->lock);
	if (write(f->bell_efd, &one, sizeof(one)) < 0)
		perror("ublkshell: FUSE doorbell");
}

/* one IO from a FUSE request: tag, us_io, hand-over; a write's data is copied */
static void submit(fuse_req_t req, struct us_fuse *f, uint32_t op_flags, uint64_t off, uint64_t len,
		   const char *wbuf)
{
	struct us_io *io;
	unsigned tag;

	if (take_tag(f, &tag)) {
		fuse_reply_err(req, EIO);
		return;
	}
	io = &f->d->q[0].ios[tag];
	io->op_flags = op_flags;
	io->start_sector = off >> 9;
	io->nr_sectors = (uint32_t)(len >> 9);
	if (wbuf)
		memcpy(io->buf, wbuf, len);
	hand_over(f, tag, req);
}

/* -- the front end's side of the pipeline (queue thread) ---------------------------- */
static void fuse_complete(struct us_queue *q, unsigned tag, int result)
{
	struct us_fuse *f = q->dev->fe_data;
	struct us_io *io = &q->ios[tag];
	fuse_req_t req = f->reqs[tag];

	if (result < 0)
		fuse_reply_err(req, -result);
	else if ((io->op_flags & 0xff) == UBLK_IO_OP_READ)
		fuse_reply_buf(req, io->buf, result);
	else if ((io->op_flags & 0xff) == UBLK_IO_OP_WRITE)
		fuse_reply_write(req, result);
	else
		fuse_reply_err(req, 0);
	q->ctr.commits++;
	q->ctr.committed++;
	pthread_mutex_lock(&f->lock);
	put_tag_locked(f, tag);
	pthread_mutex_unlock(&f->lock);
}

static int arm_poll(struct us_queue *q, int fd, unsigned kind)
{
	struct io_uring_sqe *sqe = us_get_sqe(q);

	if (!sqe)
		return -EBUSY;
	io_uring_prep_poll_add(sqe, fd, POLLIN);
	sqe->user_data = us_ud(0, kind);
	return 0;
}

static void fuse_cqe(struct us_queue *q, const struct io_uring_cqe *cqe)
{
	struct us_fuse *f = q->dev->fe_data;
	unsigned i, n;
	uint64_t v;

	switch (us_ud_kind(cqe->user_data)) {
	case UD_STOP:
		q->stopping = 2;
		return;
	case UD_FE:
		/* nonblocking: an empty doorbell only means its tags came with the last ring */
		if (read(f->bell_efd, &v, sizeof(v)) < 0 && errno != EAGAIN)
			perror("ublkshell: FUSE doorbell");
		pthread_mutex_lock(&f->lock);
		n = f->nr_handed;
		memcpy(f->batch, f->handed, n * sizeof(*f->batch));
		f->nr_handed = 0;
		pthread_mutex_unlock(&f->lock);
		if (arm_poll(q, f->bell_efd, UD_FE)) {
			q->error = -EBUSY;
			q->stopping = 2;
		}
		if (n)
			q->ctr.fetches++;
		for (i = 0; i < n; i++)
			us_io_start(q, f->batch[i]);
		return;
	}
}

static const struct us_frontend fuse_frontend = {
	.name = "fuse",
	.complete = fuse_complete,
	.cqe = fuse_cqe,
};

static void queue_loop(struct us_queue *q)
{
	for (;;) {
		if (q->stopping == 2)
			break;
		if (us_queue_turn(q))
			break;
	}
}

static void set_state(struct us_fuse *f, int state, int err)
{
	pthread_mutex_lock(&f->lock);
	f->q_state = state;
	f->q_error = err;
	pthread_cond_broadcast(&f->cond);
	pthread_mutex_unlock(&f->lock);
}

static void *queue_thread(void *arg)
{
	struct us_fuse *f = arg;
	struct us_queue *q = &f->d->q[0];
	sigset_t all;
	unsigned tag;
	int ret;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	/* the stop poll, the doorbell poll, the hung-IO timer */
	ret = us_queue_init(q, 3);
	if (!ret)
		ret = arm_poll(q, f->d->stop_efd, UD_STOP);
	if (!ret)
		ret = arm_poll(q, f->bell_efd, UD_FE);
	set_state(f, ret ? Q_FAILED : Q_SERVING, ret);
	if (!ret)
		queue_loop(q);

	pthread_mutex_lock(&f->lock);
	f->q_state = Q_ENDED;
	pthread_mutex_unlock(&f->lock);
	/* the ring's exit cancels the target's SQEs and timeouts and waits for them */
	if (q->ring_ok)
		io_uring_queue_exit(&q->ring);
	q->ring_ok = 0;
	/* whatever is still held (hung, delayed, in the target, not yet taken) ends with EIO */
	pthread_mutex_lock(&f->lock);
	for (tag = 0; q->ios && tag < (unsigned)f->d->cfg.depth; tag++) {
		if (f->reqs[tag]) {
			fuse_reply_err(f->reqs[tag], EIO);
			put_tag_locked(f, tag);
		}
	}
	f->nr_handed = 0;
	pthread_cond_broadcast(&f->cond);
	/* a worker still copying into a tag's buffer: the buffers go only after it */
	while (f->nr_filling)
		pthread_cond_wait(&f->cond, &f->lock);
	pthread_mutex_unlock(&f->lock);
	us_queue_exit(q);
	return NULL;
}

struct us_dev *fx_dev_new(struct us_fuse *f, int *err)
{
	const struct us_fuse_cfg *c = &f->cfg;
	struct us_dev *d = calloc(1, sizeof(*d) + sizeof(struct us_queue));

	*err = -ENOMEM;
	if (!d)
		return NULL;
	d->cfg.dev_id = -1;
	d->cfg.nr_queues = 1;
	d->cfg.depth = c->depth;
	d->cfg.max_io_bytes = c->max_io_bytes;
	d->cfg.cdev_fd = -1;
	d->cfg.target = c->target;
	d->cfg.backing_fd = c->backing_fd;
	d->cfg.dev_bytes = c->dev_bytes;
	d->cfg.backing_bytes = c->backing_bytes;
	d->cfg.backing_in_memory = c->backing_in_memory;
	d->cfg.shm = c->shm;
	d->cfg.no_records = c->no_records;
	d->cfg.write_log_bytes = c->write_log_bytes;
	d->cfg.write_log_fd = c->write_log_fd;
	d->cfg.logw = c->logw;
	d->fe = &fuse_frontend;
	d->fe_data = f;
	d->q[0].dev = d;
	d->q[0].cpu = -1;
	d->stop_efd = eventfd(0, EFD_CLOEXEC);
	if (d->stop_efd < 0) {
		*err = -errno;
		free(d);
		return NULL;
	}
	*err = us_dev_target_init(d);
	if (!*err && c->write_log_bytes) {
		d->wlog = us_wlog_new(c->write_log_fd, c->write_log_bytes);
		if (!d->wlog) {
			us_dev_target_deinit(d);
			*err = -ENOMEM;
		}
	}
	if (*err) {
		close(d->stop_efd);
		free(d);
		return NULL;
	}
	return d;
}

void fx_dev_free(struct us_dev *d)
{
	if (!d)
		return;
	close(d->stop_efd);
	us_wlog_free(d->wlog);
	us_dev_target_deinit(d);
	free(d);
}

/* -- IO ------------------------------------------------------------------------------ */

/* 0 with *len cut at the disk's end, or the errno to answer (sectors only, see the top) */
static int check_io(const struct us_fuse *f, off_t off, size_t size, size_t *len)
{
	if (off < 0)
		return EINVAL;
	*len = 0;
	/* the end of the disk is the end, however the read is cut */
	if ((uint64_t)off >= f->cfg.dev_bytes)
		return 0;
	if (((uint64_t)off | size) & 511 || size > f->cfg.max_io_bytes)
		return EINVAL;
	*len = size < f->cfg.dev_bytes - off ? size : f->cfg.dev_bytes - off;
	return 0;
}

void fx_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	struct us_fuse *f = fuse_req_userdata(req);
	size_t len;
	int e;

	(void)ino; (void)fi;
	if ((e = check_io(f, off, size, &len)))
		fuse_reply_err(req, e);
	else if (!len)
		fuse_reply_buf(req, NULL, 0);	/* at the end: empty, as a block device's */
	else
		submit(req, f, UBLK_IO_OP_READ, off, len, NULL);
}

void fx_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
		     struct fuse_file_info *fi)
{
	struct us_fuse *f = fuse_req_userdata(req);
	size_t len;
	int e;

	(void)ino; (void)fi;
	if ((e = check_io(f, off, size, &len)))
		fuse_reply_err(req, e);
	else if (!len)
		fuse_reply_err(req, size ? ENOSPC : 0);	/* the disk cannot grow */
	else
		submit(req, f, UBLK_IO_OP_WRITE, off, len, buf);
}

void fx_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
	(void)ino; (void)datasync; (void)fi;
	submit(req, fuse_req_userdata(req), UBLK_IO_OP_FLUSH, 0, 0, NULL);
}

void fx_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len,
			 struct fuse_file_info *fi)
{
	struct us_fuse *f = fuse_req_userdata(req);
	uint32_t op_flags;

	(void)ino; (void)fi;
	if (off < 0 || len <= 0 || ((uint64_t)off | (uint64_t)len) & 511) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	if ((uint64_t)off >= f->cfg.dev_bytes || (uint64_t)len > f->cfg.dev_bytes - off) {
		/* a block device cannot grow; within it, the range is already allocated */
		fuse_reply_err(req, (mode & ~FALLOC_FL_KEEP_SIZE) ? EINVAL : ENOSPC);
		return;
	}
	if (mode & FALLOC_FL_PUNCH_HOLE)
		op_flags = UBLK_IO_OP_DISCARD;
	else if (mode & (FALLOC_FL_ZERO_RANGE | FALLOC_FL_WRITE_ZEROES))
		/* the loop driver asks for a zero range when unmapping is not allowed */
		op_flags = UBLK_IO_OP_WRITE_ZEROES | UBLK_IO_F_NOUNMAP;
	else if (!(mode & ~FALLOC_FL_KEEP_SIZE)) {
		fuse_reply_err(req, 0);	/* preallocation inside the device: nothing to do */
		return;
	} else {
		fuse_reply_err(req, EOPNOTSUPP);
		return;
	}
	/* one request can span more than a us_io's 32-bit sector count: that many sectors at most */
	if ((uint64_t)len >> 9 > UINT32_MAX) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	submit(req, f, op_flags, off, len, NULL);
}

int us_fuse_stop_io(struct us_fuse *f)
{
	uint64_t one = 1;

	if (!f->qthr_started)
		return 0;
	if (write(f->d->stop_efd, &one, sizeof(one)) < 0)
		return -errno;
	pthread_join(f->qthr, NULL);
	f->qthr_started = 0;
	return 0;
}

int us_fuse_powercut(struct us_fuse *f, uint32_t keep_ppm, uint64_t seed, struct us_fault_area *report)
{
	int r = us_fuse_stop_io(f);

	if (r)
		return r;
	if (!f->d->wlog)
		return -EOPNOTSUPP;
	return us_wlog_powercut(f->d->wlog, keep_ppm, seed, report);
}

int fx_start_queue(struct us_fuse *f)
{
	int rc = pthread_create(&f->qthr, NULL, queue_thread, f);

	if (rc)
		return -rc;
	f->qthr_started = 1;
	pthread_mutex_lock(&f->lock);
	while (f->q_state == Q_STARTING)
		pthread_cond_wait(&f->cond, &f->lock);
	rc = f->q_state == Q_SERVING ? 0 : (f->q_error ? f->q_error : -EIO);
	pthread_mutex_unlock(&f->lock);
	if (rc) {
		pthread_join(f->qthr, NULL);
		f->qthr_started = 0;
	}
	return rc;
}
