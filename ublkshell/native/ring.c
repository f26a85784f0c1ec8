/* SPDX-License-Identifier: MIT */
/*
 * The per-queue ring loop: one thread and one io_uring per hardware queue.
 *
 * Each tag has exactly one command outstanding with the driver. A FETCH (then
 * COMMIT_AND_FETCH) completes when the driver hands us a request; the target
 * serves it, on this same ring when it has IO to do, and the result goes back
 * with the next COMMIT_AND_FETCH. Everything queued while reaping one batch of
 * CQEs is submitted with a single io_uring_enter.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/mman.h>

#include "ushell.h"

static size_t page_round(size_t n)
{
	size_t pg = (size_t)sysconf(_SC_PAGESIZE);

	return (n + pg - 1) & ~(pg - 1);
}

static void prep_uring_cmd(struct us_queue *q, struct io_uring_sqe *sqe, unsigned tag, unsigned op,
			   int result, unsigned kind)
{
	struct ublksrv_io_cmd *cmd;

	sqe->opcode = IORING_OP_URING_CMD;
	us_sqe_set_fd(q, sqe, US_FIXED_CDEV);
	sqe->cmd_op = op;
	sqe->user_data = us_ud(tag, kind);
	cmd = us_sqe_cmd(sqe);
	cmd->q_id = q->q_id;
	cmd->tag = tag;
	cmd->result = result;
	/* zero copy: no buffer here; sqe->addr names the slot the tag's next request is registered at */
	cmd->addr = q->dev->zc || q->dev->ucopy ? 0 : (uint64_t)(uintptr_t)q->ios[tag].buf;
	/* user copy has no buffer to name: the field carries where a zone append landed */
	if (op == q->dev->op_commit && (q->ios[tag].op_flags & 0xff) == UBLK_IO_OP_ZONE_APPEND)
		cmd->zone_append_lba = q->ios[tag].append_lba;
	if (q->dev->zc)
		sqe->addr = us_zc_cmd_addr(q, tag);
	q->cmd_inflight++;
	if (op == q->dev->op_commit) {
		q->ctr.commits++;
		q->ctr.committed++;
	}
}

static void queue_uring_cmd(struct us_queue *q, unsigned tag, unsigned op, int result)
{
	struct io_uring_sqe *sqe = us_get_sqe(q);

	if (!sqe) {
		/* cannot happen with the ring sized for depth; stop rather than lose a tag */
		q->error = -EBUSY;
		q->stopping = 1;
		return;
	}
	prep_uring_cmd(q, sqe, tag, op, result, UD_CMD);
}

static void ublk_link(struct us_queue *q, unsigned tag, struct io_uring_sqe *head, int result)
{
	struct us_io *io = &q->ios[tag];
	/*
	 * No us_get_sqe here: its submit when the SQ is full would send the head
	 * alone, and a commit arriving later would run whatever the head's result.
	 * Without room the head stays unlinked and its completion commits as
	 * every unlinked IO does.
	 */
	struct io_uring_sqe *sqe = io_uring_get_sqe(&q->ring);

	if (!sqe)
		return;
	us_sqe128_zero(sqe);
	head->flags |= IOSQE_IO_LINK;
	io->linked = 1;
	io->link_expect = result;
	prep_uring_cmd(q, sqe, tag, q->dev->op_commit, result, UD_LINKED);
}

static void ublk_complete(struct us_queue *q, unsigned tag, int result)
{
	queue_uring_cmd(q, tag, q->dev->op_commit, result);
}

/* the driver's answers to our commands, and the stop poll */
static void ublk_cqe(struct us_queue *q, const struct io_uring_cqe *cqe)
{
	unsigned tag = us_ud_tag(cqe->user_data);

	switch (us_ud_kind(cqe->user_data)) {
	case UD_STOP:
		q->stopping = 2;
		return;
	case UD_LINKED:
		if (cqe->res == -ECANCELED) {
			/* never sent: the IO commits again, unlinked */
			q->cmd_inflight--;
			q->ctr.commits--;
			q->ctr.committed--;
			return;
		}
		break;
	}

	q->cmd_inflight--;
	if (cqe->res == UBLK_IO_RES_OK) {
		q->ctr.fetches++;
		us_ublk_serve(q, tag);
	} else if (cqe->res == UBLK_IO_RES_ABORT) {
		/* the device is going away (STOP_DEV, or we are being torn down) */
		q->stopping = 1;
	} else {
		/* NEED_GET_DATA is never enabled; anything else is a protocol error */
		if (!q->error)
			q->error = cqe->res > 0 ? -EPROTO : cqe->res;
		q->stopping = 1;
	}
}

/* one FETCH per tag; each result goes back with that tag's next fetch */
static int ublk_queue_start(struct us_queue *q)
{
	int i;

	for (i = 0; i < q->dev->cfg.depth; i++)
		queue_uring_cmd(q, i, q->dev->op_fetch, 0);
	return q->error;
}

static const struct us_frontend ublk_frontend = {
	.name = "ublk",
	.complete = ublk_complete,
	.link = ublk_link,
	.cqe = ublk_cqe,
	.queue_start = ublk_queue_start,
};

static int queue_setup(struct us_queue *q)
{
	struct us_dev *d = q->dev;
	const struct us_dev_cfg *c = &d->cfg;
	size_t stride;
	int ret;

	if (q->cpu >= 0) {
		cpu_set_t set;

		CPU_ZERO(&set);
		CPU_SET(q->cpu, &set);
		/* best effort: a cpuset may forbid the cpu the driver prefers */
		sched_setaffinity(0, sizeof(set), &set);
	}

	/* the stop poll and the hung-IO timer besides the IOs */
	ret = us_queue_init(q, 3);
	if (ret)
		return ret;

	/* the driver lays the queues out at a stride sized for the largest depth */
	stride = page_round(UBLK_MAX_QUEUE_DEPTH * sizeof(struct ublksrv_io_desc));
	q->iods_len = page_round(c->depth * sizeof(struct ublksrv_io_desc));
	q->iods = mmap(NULL, q->iods_len, PROT_READ, MAP_SHARED | MAP_POPULATE,
		       c->cdev_fd, UBLKSRV_CMD_BUF_OFFSET + (off_t)q->q_id * stride);
	if (q->iods == MAP_FAILED) {
		q->iods = NULL;
		return -errno;
	}
	/* the first commands wait in the SQ until the loop's first submit, after every queue is set up */
	return d->fe->queue_start(q);
}

static int queue_stop_poll(struct us_queue *q)
{
	struct io_uring_sqe *sqe = us_get_sqe(q);

	if (!sqe)
		return -EBUSY;
	io_uring_prep_poll_add(sqe, q->dev->stop_efd, POLLIN);
	sqe->user_data = us_ud(0, UD_STOP);
	return 0;
}

static void queue_loop(struct us_queue *q)
{
	/* an empty ring has room; without the poll us_dev_abort could not reach this queue */
	q->error = queue_stop_poll(q);
	if (q->error)
		return;

	for (;;) {
		if (q->stopping == 2)
			break;
		if (q->stopping && !q->cmd_inflight && !q->tgt_inflight && !q->results_pending)
			break;
		if (us_queue_turn(q))
			break;
	}
}

static void queue_teardown(struct us_queue *q)
{
	/* exiting the ring cancels what is still outstanding: the driver sees an abort */
	us_queue_exit(q);
	if (q->dev->fe->queue_exit)
		q->dev->fe->queue_exit(q);
	if (q->iods)
		munmap((void *)q->iods, q->iods_len);
	q->iods = NULL;
}

static void *queue_thread(void *arg)
{
	struct us_queue *q = arg;
	struct us_dev *d = q->dev;
	int ret = queue_setup(q), go;

	pthread_mutex_lock(&d->lock);
	if (ret) {
		q->error = ret;
		d->nr_failed++;
	}
	d->nr_ready++;
	pthread_cond_broadcast(&d->cond);
	while (!d->go)
		pthread_cond_wait(&d->cond, &d->lock);
	go = d->go;
	pthread_mutex_unlock(&d->lock);

	if (go > 0 && !ret)
		queue_loop(q);
	queue_teardown(q);

	pthread_mutex_lock(&d->lock);
	d->nr_exited++;
	pthread_cond_broadcast(&d->cond);
	pthread_mutex_unlock(&d->lock);
	return NULL;
}

/*
 * The device's lock and condition variable; us_dev_wait's deadline is on
 * CLOCK_MONOTONIC, so a clock step (NTP, date -s) neither ends nor stretches it.
 */
static int sync_init(struct us_dev *d)
{
	pthread_condattr_t ca;
	int rc;

	rc = pthread_condattr_init(&ca);
	if (rc)
		return rc;
	rc = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	if (!rc)
		rc = pthread_cond_init(&d->cond, &ca);
	pthread_condattr_destroy(&ca);
	if (rc)
		return rc;
	rc = pthread_mutex_init(&d->lock, NULL);
	if (rc)
		pthread_cond_destroy(&d->cond);
	return rc;
}

struct us_dev *us_dev_start(const struct us_dev_cfg *cfg, int *err)
{
	struct us_dev *d;
	int i, started = 0;

	*err = 0;
	if (cfg->nr_queues < 1 || cfg->depth < 1 || cfg->depth > UBLK_MAX_QUEUE_DEPTH ||
	    cfg->max_io_bytes < 512 || !us_target_type(cfg->target)) {
		*err = -EINVAL;
		return NULL;
	}
	d = calloc(1, sizeof(*d) + cfg->nr_queues * sizeof(struct us_queue));
	if (!d) {
		*err = -ENOMEM;
		return NULL;
	}
	d->cfg = *cfg;
	/* the device was added with BATCH_IO or not: the kernel takes only that protocol */
	d->fe = cfg->dev_flags & UBLK_F_BATCH_IO ? &us_ublk_batch_frontend : &ublk_frontend;
	/* the daemon refuses AUTO_BUF_REG without USER_COPY, the copy path, before it gets here */
	d->zc = !!(cfg->dev_flags & UBLK_F_AUTO_BUF_REG);
	d->ucopy = !d->zc && (cfg->dev_flags & UBLK_F_USER_COPY);
	*err = us_dev_target_init(d);
	if (*err) {
		free(d);
		return NULL;
	}
	d->op_fetch = cfg->ioctl_encode ? UBLK_U_IO_FETCH_REQ : UBLK_IO_FETCH_REQ;
	d->op_commit = cfg->ioctl_encode ? UBLK_U_IO_COMMIT_AND_FETCH_REQ :
		UBLK_IO_COMMIT_AND_FETCH_REQ;
	d->stop_efd = eventfd(0, EFD_CLOEXEC);
	if (d->stop_efd < 0) {
		*err = -errno;
		us_dev_target_deinit(d);
		free(d);
		return NULL;
	}
	*err = -sync_init(d);
	if (*err) {
		close(d->stop_efd);
		us_dev_target_deinit(d);
		free(d);
		return NULL;
	}
	if (cfg->write_log_bytes) {
		d->wlog = us_wlog_new(cfg->write_log_fd, cfg->write_log_bytes);
		if (!d->wlog) {
			*err = -ENOMEM;
			close(d->stop_efd);
			pthread_mutex_destroy(&d->lock);
			pthread_cond_destroy(&d->cond);
			us_dev_target_deinit(d);
			free(d);
			return NULL;
		}
	}

	for (i = 0; i < cfg->nr_queues; i++) {
		struct us_queue *q = &d->q[i];

		q->dev = d;
		q->q_id = i;
		q->cpu = i < 64 ? cfg->cpus[i] : -1;
		if (pthread_create(&q->thr, NULL, queue_thread, q)) {
			*err = -EAGAIN;
			break;
		}
		started++;
	}

	pthread_mutex_lock(&d->lock);
	while (d->nr_ready < started)
		pthread_cond_wait(&d->cond, &d->lock);
	if (!*err && d->nr_failed) {
		for (i = 0; i < started; i++)
			if (d->q[i].error) {
				*err = d->q[i].error;
				break;
			}
	}
	d->go = *err ? -1 : 1;
	pthread_cond_broadcast(&d->cond);
	pthread_mutex_unlock(&d->lock);

	if (*err) {
		for (i = 0; i < started; i++)
			pthread_join(d->q[i].thr, NULL);
		close(d->stop_efd);
		us_wlog_free(d->wlog);
		pthread_mutex_destroy(&d->lock);
		pthread_cond_destroy(&d->cond);
		us_dev_target_deinit(d);
		free(d);
		return NULL;
	}
	return d;
}

int us_dev_wait(struct us_dev *d, int timeout_ms)
{
	struct timespec ts;
	int done;

	us_deadline(&ts, CLOCK_MONOTONIC, timeout_ms);
	pthread_mutex_lock(&d->lock);
	while (d->nr_exited < d->cfg.nr_queues)
		if (pthread_cond_timedwait(&d->cond, &d->lock, &ts) == ETIMEDOUT)
			break;
	done = d->nr_exited >= d->cfg.nr_queues;
	pthread_mutex_unlock(&d->lock);
	return done;
}

void us_dev_abort(struct us_dev *d)
{
	uint64_t one = 1;

	if (write(d->stop_efd, &one, sizeof(one)) < 0)
		perror("ublkshell: stop eventfd");
}

int us_dev_queue_error(struct us_dev *d, int q_id)
{
	if (q_id < 0 || q_id >= d->cfg.nr_queues)
		return -EINVAL;
	return d->q[q_id].error;
}

void us_dev_free(struct us_dev *d)
{
	int i;

	if (!d)
		return;
	us_dev_abort(d);
	for (i = 0; i < d->cfg.nr_queues; i++)
		pthread_join(d->q[i].thr, NULL);
	close(d->stop_efd);
	us_wlog_free(d->wlog);
	us_dev_target_deinit(d);
	pthread_mutex_destroy(&d->lock);
	pthread_cond_destroy(&d->cond);
	free(d);
}
