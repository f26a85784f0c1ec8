/* SPDX-License-Identifier: MIT */
/*
 * The one IO pipeline. A front end (ring.c for ublk, fuse_transport.c for
 * FUSE) fills a tag's us_io and calls us_io_start on its queue thread; from
 * there every IO takes the same path whatever brought it:
 *
 *   record begin -> fault rules -> power-cut log, write log -> target (queue_io,
 *   io_done) -> fault finish -> power-cut log, write log -> record end
 *   -> front end's complete()
 *
 * Delays and hangs park the IO on the same ring (faults.c), so a front end
 * gets them for free as long as it reaps its ring through us_handle_cqe.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/syscall.h>

#include "ushell.h"

#define US_FEAT_MIN_TIMEOUT	(1U << 15)	/* IORING_FEAT_MIN_TIMEOUT */


struct io_uring_sqe *us_get_sqe(struct us_queue *q)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&q->ring);

	if (!sqe) {
		io_uring_submit(&q->ring);
		q->ctr.enters++;
		sqe = io_uring_get_sqe(&q->ring);
	}
	if (sqe)
		us_sqe128_zero(sqe);
	return sqe;
}

void us_link_commit(struct us_queue *q, unsigned tag, struct io_uring_sqe *head, int result)
{
	/* a front end that cannot link completes from the head's CQE like any other IO */
	if (q->dev->fe->link)
		q->dev->fe->link(q, tag, head, result);
}

/* everything but handing the result back: also what a linked completion still needs */
static int io_end(struct us_queue *q, unsigned tag, int result)
{
	struct us_io *io = &q->ios[tag];

	if (io->fh.action)
		result = us_fault_finish(q, tag, io, result);
	if (q->dev->wlog)
		us_wlog_end(q, io, result);
	if (io->lw)
		us_lw_end(q, io, result);
	if (io->bounce || q->dev->ucopy)
		result = us_io_copy_out(q, tag, io, result);
	us_rec_end(q, tag, io, result);
	return result;
}

void us_io_complete(struct us_queue *q, unsigned tag, int result)
{
	q->dev->fe->complete(q, tag, io_end(q, tag, result));
}

/*
 * Zero copy, but this IO's data must pass through here: the target computes
 * it, or the driver could not register the request's pages (ublk_buffers.c).
 * A corrupt fault bounces its IO when it matches (faults.c). The power-cut log
 * keeps only what a write overwrites, read from the store, so it needs no copy;
 * the write log (--log-writes) keeps a write's data, so it does.
 */
static int must_copy(const struct us_queue *q, const struct us_io *io)
{
	return !q->dev->tgt_zc || io->op_flags & UBLK_IO_F_NEED_REG_BUF || q->dev->cfg.logw;
}

void us_start_target(struct us_queue *q, unsigned tag)
{
	struct us_io *io = &q->ios[tag];
	int r;

	if (io->zc && must_copy(q, io)) {
		r = us_io_bounce(q, tag, io);
		if (r) {
			us_io_complete(q, tag, r);
			return;
		}
	}
	if (q->dev->wlog)
		us_wlog_begin(q, io);
	if (q->dev->cfg.logw)
		us_lw_begin(q, io);
	r = q->dev->tgt->queue_io(q, tag, io);

	if (r != US_QUEUED)
		us_io_complete(q, tag, r);
}

void us_io_start(struct us_queue *q, unsigned tag)
{
	struct us_io *io = &q->ios[tag];
	int r;

	io->done = 0;
	io->attempt = 0;
	io->fault = 0;
	io->bounce = 0;
	io->lw = NULL;
	/* a fault's leftovers must not reach io_end of an IO no rule looked at */
	memset(&io->fh, 0, sizeof(io->fh));
	q->turn_ios++;
	us_rec_begin(q, tag, io);
	r = io->copy_err ? io->copy_err : us_fault_start(q, tag, io);
	if (r == US_FAULT_PASS)
		us_start_target(q, tag);
	else if (r != US_QUEUED)
		us_io_complete(q, tag, r);
}

void us_handle_cqe(struct us_queue *q, const struct io_uring_cqe *cqe)
{
	unsigned tag = us_ud_tag(cqe->user_data);
	struct us_io *io;
	int r, link_ok;

	switch (us_ud_kind(cqe->user_data)) {
	case UD_DELAY:
		q->tgt_inflight--;
		/* cancelled: the ring is going away and the front end ends the request */
		if (cqe->res != -ECANCELED)
			us_start_target(q, tag);
		return;
	case UD_TICK:
		us_fault_tick(q);
		return;
	case UD_TGT:
		io = &q->ios[tag];
		link_ok = io->linked && cqe->res == io->link_expect;
		q->tgt_inflight--;
		/* a failed or short head cancels the linked completion: complete the real result later */
		io->linked = 0;
		if (!q->dev->tgt->io_done) {
			/* a target that queued SQEs without io_done broke the contract: do not lose the tag */
			r = cqe->res;
		} else {
			r = q->dev->tgt->io_done(q, tag, io, cqe->res);
		}
		if (link_ok)
			io_end(q, tag, io->link_expect);
		else if (r != US_QUEUED)
			us_io_complete(q, tag, r);
		return;
	}
	q->dev->fe->cqe(q, cqe);
}

/*
 * One turn of a queue thread, whichever front end runs it: send what the last
 * turn produced, wait for a completion, then reap every CQE there is before
 * the next submit. Nonzero (q->error set) when the ring itself failed.
 */
static void publish_counters(struct us_queue *q)
{
	struct us_shm_queue *sq = q->shmq;

	if (!sq)
		return;
	/* single writer; a reader may see one counter a turn ahead of another */
	__atomic_store_n(&sq->enters, q->ctr.enters, __ATOMIC_RELAXED);
	__atomic_store_n(&sq->cqes, q->ctr.cqes, __ATOMIC_RELAXED);
	__atomic_store_n(&sq->fetches, q->ctr.fetches, __ATOMIC_RELAXED);
	__atomic_store_n(&sq->commits, q->ctr.commits, __ATOMIC_RELAXED);
	__atomic_store_n(&sq->committed, q->ctr.committed, __ATOMIC_RELAXED);
	__atomic_store_n(&sq->copied, q->ctr.copied, __ATOMIC_RELAXED);
}

/* struct io_uring_getevents_arg as 6.13+ lays it out (older headers name min_wait_usec "pad") */
struct us_getevents_arg {
	uint64_t	sigmask;
	uint32_t	sigmask_sz;
	uint32_t	min_wait_usec;
	uint64_t	ts;
};

/*
 * Submit and wait for wait_nr CQEs, for at most timeout_ms; with min_wait_us,
 * once that long has passed since the wait began, any one CQE ends it (the
 * kernel's min-wait, 6.13+). One io_uring_enter; liburing 2.3 cannot pass
 * min-wait, so the SQ is flushed here as liburing's own submit does.
 */
static int submit_and_wait_ext(struct us_queue *q, unsigned wait_nr, unsigned min_wait_us,
			       unsigned timeout_ms)
{
	struct io_uring_sq *sq = &q->ring.sq;
	struct __kernel_timespec ts = { timeout_ms / 1000, (long long)(timeout_ms % 1000) * 1000000 };
	struct us_getevents_arg arg = { 0, 0, min_wait_us, (uint64_t)(uintptr_t)&ts };
	unsigned tail = sq->sqe_tail, submit;
	unsigned flags = IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG;
	long ret;

	if (sq->sqe_head != tail) {
		sq->sqe_head = tail;
		io_uring_smp_store_release(sq->ktail, tail);
	}
	submit = tail - io_uring_smp_load_acquire(sq->khead);
	if (q->ring_fd_registered)
		flags |= IORING_ENTER_REGISTERED_RING;
	ret = syscall(__NR_io_uring_enter, q->ring.enter_ring_fd, submit, wait_nr, flags,
		      &arg, sizeof(arg));
	return ret < 0 ? -errno : (int)ret;
}

/*
 * Under load a turn that wakes for the first CQE serves one IO per enter.
 * When recent turns each brought several IOs, the queue is busy and more are
 * on their way: wait for one more than the recent turns brought (so the batch
 * grows while the load allows), but once coalesce_us have passed since the
 * wait began, go with whatever came. busy_avg over 9 is more than ~1.1 IOs
 * per turn: a queue at depth 1 never waits, as its next IO cannot come before
 * this one ends. Returns the CQEs to wait for (0: an ordinary wait for one).
 */
static unsigned coalesce(struct us_queue *q)
{
	unsigned want;

	q->busy_avg = q->busy_avg - q->busy_avg / 8 + q->turn_ios;
	q->turn_ios = 0;
	if (!q->min_wait_ok || !q->dev->cfg.coalesce_us || q->busy_avg <= 9)
		return 0;
	want = q->busy_avg / 8 + 1;
	return want < 2 ? 2 : want > (unsigned)q->dev->cfg.depth ? (unsigned)q->dev->cfg.depth : want;
}

int us_queue_turn(struct us_queue *q)
{
	struct io_uring_cqe *cqe;
	unsigned head, n = 0, quiet = 0, want;
	int ret;

	if (q->dev->fe->flush)
		quiet = q->dev->fe->flush(q);
	/* a stopping queue waits for exactly those answers: nothing else may come */
	if (q->stopping)
		quiet = 0;
	/* everything up to here is counted before the turn may block */
	publish_counters(q);
	/*
	 * With a wait count liburing always enters: one turn is one io_uring_enter.
	 * A batched commit completes inline, so waiting for one CQE would wake
	 * on its own answer and cost a second enter for the work that follows.
	 */
	want = coalesce(q);
	if (want)
		/* an idle queue still wakes once a second, and then stops waiting (busy_avg 0) */
		ret = submit_and_wait_ext(q, want + quiet, q->dev->cfg.coalesce_us, 1000);
	else if (quiet && q->ext_arg_ok)
		/* a commit refused at once is an error the queue must see: do not sleep past it */
		ret = submit_and_wait_ext(q, 1 + quiet, 0, 100);
	else
		ret = io_uring_submit_and_wait(&q->ring, 1 + quiet);
	q->ctr.enters++;
	if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY && ret != -ETIME) {
		q->error = ret;
		return ret;
	}
	io_uring_for_each_cqe(&q->ring, head, cqe) {
		us_handle_cqe(q, cqe);
		n++;
	}
	io_uring_cq_advance(&q->ring, n);
	q->ctr.cqes += n;
	if (!n)
		q->busy_avg = 0;
	return 0;
}

int us_dev_target_init(struct us_dev *d)
{
	d->tgt = us_target_type(d->cfg.target);
	if (!d->tgt || !d->tgt->queue_io)
		return -EINVAL;
	d->tgt_zc = !!(d->tgt->info.flags & US_TGT_F_ZERO_COPY);
	return d->tgt->init ? d->tgt->init(d) : 0;
}

void us_dev_target_deinit(struct us_dev *d)
{
	if (d->tgt && d->tgt->deinit)
		d->tgt->deinit(d);
	d->tgt_data = NULL;
}

static unsigned ring_entries(const struct us_queue *q, unsigned extra)
{
	unsigned per_io = q->dev->tgt->info.sqes_per_io;

	if (per_io > US_MAX_SQES_PER_IO)
		per_io = US_MAX_SQES_PER_IO;
	/*
	 * A tag has its front end's command (or linked completion) plus the
	 * target's SQEs or a delay timeout in flight; us_get_sqe submits when the
	 * SQ fills, so this bounds the CQ, which must never overflow.
	 */
	return q->dev->cfg.depth * (1 + (per_io ? per_io : 1)) + extra;
}

int us_queue_init(struct us_queue *q, unsigned extra)
{
	const struct us_dev_cfg *c = &q->dev->cfg;
	struct io_uring_params p;
	unsigned entries = ring_entries(q, extra);
	int ret, i;

	memset(&p, 0, sizeof(p));
	p.flags = IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE | IORING_SETUP_COOP_TASKRUN |
		IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
	p.cq_entries = 2 * entries;
	ret = io_uring_queue_init_params(entries, &q->ring, &p);
	if (ret == -EINVAL) {
		/* kernels before 6.1 know no DEFER_TASKRUN */
		memset(&p, 0, sizeof(p));
		p.flags = IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE;
		p.cq_entries = 2 * entries;
		ret = io_uring_queue_init_params(entries, &q->ring, &p);
	}
	if (ret < 0)
		return ret;
	q->ring_ok = 1;

	/* fixed files and a registered ring fd spare an fget/fput per SQE and per enter */
	if (c->backing_fd >= 0 || c->cdev_fd >= 0) {
		/* -1 leaves a slot empty (the FUSE front end has no char device) */
		int fds[2] = { c->cdev_fd, c->backing_fd };

		q->fixed_files = io_uring_register_files(&q->ring, fds, c->backing_fd >= 0 ? 2 : 1) == 0;
	}
	q->ring_fd_registered = io_uring_register_ring_fd(&q->ring) == 1;
	ret = us_zc_queue_init(q);
	if (ret)
		return ret;
	q->min_wait_ok = !!(p.features & US_FEAT_MIN_TIMEOUT);
	q->ext_arg_ok = !!(p.features & IORING_FEAT_EXT_ARG);

	q->ios = calloc(c->depth, sizeof(*q->ios));
	if (!q->ios)
		return -ENOMEM;
	q->bufs_len = (size_t)c->depth * c->max_io_bytes;
	q->bufs = mmap(NULL, q->bufs_len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (q->bufs == MAP_FAILED) {
		q->bufs = NULL;
		return -ENOMEM;
	}
	for (i = 0; i < c->depth; i++)
		q->ios[i].buf = q->bufs + (size_t)i * c->max_io_bytes;
	if (c->shm && !c->no_records)
		us_shm_attach(q, c->shm);
	if (q->shmq) {
		/* a recovered device's counters carry on, as its op counters do */
		q->ctr.enters = q->shmq->enters;
		q->ctr.cqes = q->shmq->cqes;
		q->ctr.fetches = q->shmq->fetches;
		q->ctr.commits = q->shmq->commits;
		q->ctr.committed = q->shmq->committed;
		q->ctr.copied = q->shmq->copied;
	}
	return c->shm ? us_fault_attach(q, c->shm) : 0;
}

void us_queue_exit(struct us_queue *q)
{
	/* exiting the ring cancels what is still outstanding (ublk: the driver sees an abort) */
	if (q->ring_ok)
		io_uring_queue_exit(&q->ring);
	q->ring_ok = 0;
	if (q->bufs)
		munmap(q->bufs, q->bufs_len);
	q->bufs = NULL;
	free(q->ios);
	q->ios = NULL;
	if (q->fa && q->nr_hung)
		__atomic_fetch_sub(&q->fa->hung, q->nr_hung, __ATOMIC_RELAXED);
	q->nr_hung = 0;
	us_fault_detach(q);
}
