/* SPDX-License-Identifier: MIT */
/*
 * The ublk front end for devices added with UBLK_F_BATCH_IO.
 *
 * Per-tag mode costs one command per IO each way. Here one PREP_IO_CMDS
 * hands the driver every tag's buffer, a multishot FETCH_IO_CMDS brings in
 * whatever requests are ready as a list of tags per CQE, and the results a
 * turn gathered go back in one COMMIT_IO_CMDS just before the turn's submit.
 * The pipeline (faults, records, targets, the power-cut log) is the same.
 *
 * The tag lists land in provided buffers consumed incrementally
 * (IOU_PBUF_RING_INC): one buffer group per fetch command, each CQE's tags
 * follow the previous CQE's in that buffer. Two fetch commands stay armed so
 * that one takes over while the other is re-armed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "ushell.h"

#ifndef IORING_URING_CMD_MULTISHOT
#define IORING_URING_CMD_MULTISHOT	(1U << 1)
#endif
#ifndef IOU_PBUF_RING_INC
#define IOU_PBUF_RING_INC		2
#endif

#define NR_FETCH		2
#define FETCH_BUF_BYTES		(64 * 1024)	/* 32768 tags before a buffer is renewed */
#define NR_COMMIT_BUFS		4

/* user_data tag field of our commands: what it is in the top bits, which buffer below */
enum { SUB_PREP = 1, SUB_COMMIT = 2, SUB_FETCH = 3 };
#define SUB_SHIFT	12
#define SUB_IDX_MASK	((1u << SUB_SHIFT) - 1)

/* struct io_uring_buf_reg as 6.x lays it out (liburing 2.3 names flags "pad", 2.4+ "flags") */
struct us_buf_reg {
	uint64_t	ring_addr;
	uint32_t	ring_entries;
	uint16_t	bgid;
	uint16_t	flags;
	uint64_t	resv[3];
};

/*
 * An element is its header, then (UBLK_BATCH_F_HAS_BUF_ADDR) the tag's buffer,
 * then (UBLK_BATCH_F_HAS_ZONE_LBA, a zoned device) where a zone append landed.
 * A zero-copy device has no daemon buffers, its buf_index names the slot the
 * tag's pages are registered at; a user-copy device (zoned) names none.
 */
struct batch_elem {
	struct ublk_elem_header h;
	uint64_t	buf_addr;
	uint64_t	zone_lba;
};

struct us_batch {
	struct io_uring_buf_ring *br[NR_FETCH];
	size_t		br_len;
	char		*fetch_buf[NR_FETCH];
	unsigned	fetch_off[NR_FETCH];	/* where the next CQE's tags start */
	char		*commit_buf[NR_COMMIT_BUFS];
	unsigned	elem_bytes;		/* 8, and 8 more for each of buf_addr and zone_lba */
	uint16_t	elem_flags;
	unsigned	commit_busy;		/* bit i: buffer i is in a command in flight */
	unsigned	commit_nr[NR_COMMIT_BUFS];	/* elements sent in it */
	int		cur;			/* the buffer results are gathered in */
	unsigned	nr;			/* ... and how many */
};

static struct io_uring_sqe *batch_cmd(struct us_queue *q, unsigned op, unsigned sub, unsigned idx,
				      unsigned nr_elem, unsigned elem_bytes, uint16_t flags)
{
	struct io_uring_sqe *sqe = us_get_sqe(q);
	struct ublk_batch_io *cmd;

	if (!sqe)
		return NULL;
	sqe->opcode = IORING_OP_URING_CMD;
	us_sqe_set_fd(q, sqe, US_FIXED_CDEV);
	sqe->cmd_op = op;
	sqe->user_data = us_ud((sub << SUB_SHIFT) | idx, UD_CMD);
	cmd = us_sqe_cmd(sqe);
	cmd->q_id = q->q_id;
	cmd->flags = flags;
	cmd->nr_elem = nr_elem;
	cmd->elem_bytes = elem_bytes;
	/* fetches are not waited for at the end: STOP_DEV may leave the active one armed */
	if (sub != SUB_FETCH)
		q->cmd_inflight++;
	return sqe;
}

static int arm_fetch(struct us_queue *q, unsigned i)
{
	struct io_uring_sqe *sqe = batch_cmd(q, UBLK_U_IO_FETCH_IO_CMDS, SUB_FETCH, i,
					     FETCH_BUF_BYTES / 2, 2, 0);

	if (!sqe)
		return -EBUSY;
	sqe->uring_cmd_flags = IORING_URING_CMD_MULTISHOT;
	sqe->flags |= IOSQE_BUFFER_SELECT;
	sqe->buf_group = i;
	return 0;
}

/* the fetch buffer is used up (or new): put it back whole */
static void renew_fetch_buf(struct us_batch *b, unsigned i)
{
	io_uring_buf_ring_add(b->br[i], b->fetch_buf[i], FETCH_BUF_BYTES, 0,
			      io_uring_buf_ring_mask(1), 0);
	io_uring_buf_ring_advance(b->br[i], 1);
	b->fetch_off[i] = 0;
}

static int free_commit_buf(const struct us_batch *b)
{
	int i;

	for (i = 0; i < NR_COMMIT_BUFS; i++)
		if (i != b->cur && !(b->commit_busy & (1u << i)))
			return i;
	return -1;
}

/* send what this turn gathered; without a spare buffer it waits for a commit to come back */
static unsigned batch_flush(struct us_queue *q)
{
	struct us_batch *b = q->fe_q;
	struct io_uring_sqe *sqe;
	int next;

	if (!b->nr)
		return 0;
	next = free_commit_buf(b);
	if (next < 0)
		return 0;
	sqe = batch_cmd(q, UBLK_U_IO_COMMIT_IO_CMDS, SUB_COMMIT, b->cur, b->nr, b->elem_bytes,
			b->elem_flags);
	if (!sqe) {
		q->error = -EBUSY;
		q->stopping = 1;
		return 0;
	}
	sqe->addr = (uint64_t)(uintptr_t)b->commit_buf[b->cur];
	sqe->len = b->nr * b->elem_bytes;
	b->commit_busy |= 1u << b->cur;
	b->commit_nr[b->cur] = b->nr;
	q->ctr.commits++;
	q->ctr.committed += b->nr;
	b->cur = next;
	b->nr = 0;
	q->results_pending = 0;
	return 1;
}

static void batch_complete(struct us_queue *q, unsigned tag, int result)
{
	struct us_batch *b = q->fe_q;
	char *e = b->commit_buf[b->cur] + b->nr++ * b->elem_bytes;
	struct ublk_elem_header *h = (struct ublk_elem_header *)e;
	unsigned off = sizeof(*h);

	/* a tag is ours once per fetch, so depth elements always fit */
	h->tag = tag;
	/* zero copy: the slot unregistered now, and the one the tag's next request is registered at */
	h->buf_index = us_zc_slot(q, tag);
	h->result = result;
	if (b->elem_flags & UBLK_BATCH_F_HAS_BUF_ADDR) {
		uint64_t addr = (uint64_t)(uintptr_t)q->ios[tag].buf;

		memcpy(e + off, &addr, sizeof(addr));
		off += sizeof(addr);
	}
	if (b->elem_flags & UBLK_BATCH_F_HAS_ZONE_LBA) {
		/* as the per-tag commit: only a zone append's result has a place */
		uint64_t lba = (q->ios[tag].op_flags & 0xff) == UBLK_IO_OP_ZONE_APPEND ? q->ios[tag].append_lba : 0;

		memcpy(e + off, &lba, sizeof(lba));
	}
	q->results_pending = b->nr;
}

static void fail(struct us_queue *q, int err)
{
	if (!q->error)
		q->error = err;
	q->stopping = 1;
}

static void fetch_cqe(struct us_queue *q, unsigned i, const struct io_uring_cqe *cqe)
{
	struct us_batch *b = q->fe_q;
	unsigned n, k, depth = q->dev->cfg.depth;

	if (cqe->res > 0) {
		const uint16_t *tags = (const uint16_t *)(b->fetch_buf[i] + b->fetch_off[i]);

		n = (unsigned)cqe->res / 2;
		if ((cqe->res & 1) || b->fetch_off[i] + (unsigned)cqe->res > FETCH_BUF_BYTES || n > depth) {
			fail(q, -EPROTO);
			return;
		}
		b->fetch_off[i] += cqe->res;
		q->ctr.fetches++;
		for (k = 0; k < n; k++) {
			if (tags[k] >= depth) {
				fail(q, -EPROTO);
				return;
			}
			us_ublk_serve(q, tags[k]);
		}
	}
	if (cqe->flags & IORING_CQE_F_MORE)
		return;
	/* this fetch command ended */
	if (cqe->res < 0 && cqe->res != -ENOBUFS) {
		/* -ENODEV: the device stops (or aborts); anything else is ours to report */
		if (cqe->res != UBLK_IO_RES_ABORT && cqe->res != -ECANCELED)
			fail(q, cqe->res);
		q->stopping = q->stopping ? q->stopping : 1;
		return;
	}
	if (q->stopping)
		return;
	/*
	 * Renew the buffer only once it is used up: while it has room it is still
	 * in the ring (the driver ends a fetch with -ENOBUFS also when it could not
	 * post a CQE, and keeps those tags for the next one).
	 */
	if (b->fetch_off[i] >= FETCH_BUF_BYTES)
		renew_fetch_buf(b, i);
	if (arm_fetch(q, i))
		fail(q, -EBUSY);
}

static void batch_cqe(struct us_queue *q, const struct io_uring_cqe *cqe)
{
	struct us_batch *b = q->fe_q;
	unsigned field = us_ud_tag(cqe->user_data);
	unsigned idx = field & SUB_IDX_MASK;

	if (us_ud_kind(cqe->user_data) == UD_STOP) {
		q->stopping = 2;
		return;
	}
	switch (field >> SUB_SHIFT) {
	case SUB_FETCH:
		if (idx < NR_FETCH)
			fetch_cqe(q, idx, cqe);
		return;
	case SUB_PREP:
		q->cmd_inflight--;
		b->commit_busy &= ~1u;
		if (cqe->res < 0) {
			fail(q, cqe->res);
			return;
		}
		/*
		 * Fetch only once the queue is prepared: after a crash the driver
		 * refuses fetches (-ENODEV) until every tag of the queue is.
		 */
		for (idx = 0; idx < NR_FETCH; idx++)
			if (arm_fetch(q, idx))
				fail(q, -EBUSY);
		return;
	case SUB_COMMIT:
		q->cmd_inflight--;
		if (idx >= NR_COMMIT_BUFS)
			return;
		b->commit_busy &= ~(1u << idx);
		/* a commit refused as the device goes away only ends the queue */
		if (cqe->res == UBLK_IO_RES_ABORT)
			q->stopping = q->stopping ? q->stopping : 1;
		else if (cqe->res != (int)(b->commit_nr[idx] * b->elem_bytes))
			/* short: an element the driver refused (a tag not ours), and those after it unsent */
			fail(q, cqe->res < 0 ? cqe->res : -EPROTO);
		return;
	}
}

static void batch_queue_exit(struct us_queue *q)
{
	struct us_batch *b = q->fe_q;
	int i;

	if (!b)
		return;
	for (i = 0; i < NR_FETCH; i++) {
		/* the ring is gone and took the registration with it */
		if (b->br[i])
			munmap(b->br[i], b->br_len);
		free(b->fetch_buf[i]);
	}
	for (i = 0; i < NR_COMMIT_BUFS; i++)
		free(b->commit_buf[i]);
	free(b);
	q->fe_q = NULL;
}

static int register_fetch_ring(struct us_queue *q, struct us_batch *b, unsigned i)
{
	struct us_buf_reg reg;
	int ret;

	b->br[i] = mmap(NULL, b->br_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (b->br[i] == MAP_FAILED) {
		b->br[i] = NULL;
		return -ENOMEM;
	}
	if (posix_memalign((void **)&b->fetch_buf[i], 4096, FETCH_BUF_BYTES))
		return -ENOMEM;
	io_uring_buf_ring_init(b->br[i]);
	memset(&reg, 0, sizeof(reg));
	reg.ring_addr = (uint64_t)(uintptr_t)b->br[i];
	reg.ring_entries = 1;
	reg.bgid = i;
	/* tags from many CQEs share one buffer */
	reg.flags = IOU_PBUF_RING_INC;
	ret = io_uring_register_buf_ring(&q->ring, (void *)&reg, 0);
	if (ret)
		return ret;
	renew_fetch_buf(b, i);
	return 0;
}

/* buffers, then PREP_IO_CMDS for every tag, waiting in the SQ; its completion arms the fetches */
static int batch_queue_start(struct us_queue *q)
{
	unsigned depth = q->dev->cfg.depth, i;
	struct io_uring_sqe *sqe;
	struct us_batch *b;
	int ret;

	b = calloc(1, sizeof(*b));
	if (!b)
		return -ENOMEM;
	q->fe_q = b;
	b->br_len = sizeof(struct io_uring_buf);
	for (i = 0; i < NR_FETCH; i++) {
		ret = register_fetch_ring(q, b, i);
		if (ret)
			return ret;
	}
	b->elem_bytes = sizeof(struct ublk_elem_header);
	if (q->dev->zc) {
		/* a slot the kernel cannot fill brings the tag flagged NEED_REG_BUF: it takes the copy path */
		b->elem_flags = UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK;
	} else if (!q->dev->ucopy) {
		b->elem_bytes += sizeof(uint64_t);
		b->elem_flags = UBLK_BATCH_F_HAS_BUF_ADDR;
	}
	if (q->dev->cfg.zone_sectors) {
		b->elem_bytes += sizeof(uint64_t);
		b->elem_flags |= UBLK_BATCH_F_HAS_ZONE_LBA;
	}
	for (i = 0; i < NR_COMMIT_BUFS; i++) {
		b->commit_buf[i] = calloc(depth, sizeof(struct batch_elem));
		if (!b->commit_buf[i])
			return -ENOMEM;
	}
	/* buffer 0 carries the PREP; results gather in buffer 1 meanwhile */
	for (i = 0; i < depth; i++)
		batch_complete(q, i, 0);
	sqe = batch_cmd(q, UBLK_U_IO_PREP_IO_CMDS, SUB_PREP, 0, depth, b->elem_bytes, b->elem_flags);
	if (!sqe)
		return -EBUSY;
	sqe->addr = (uint64_t)(uintptr_t)b->commit_buf[0];
	sqe->len = depth * b->elem_bytes;
	b->commit_busy = 1;
	b->cur = 1;
	b->nr = 0;
	q->results_pending = 0;
	return 0;
}

const struct us_frontend us_ublk_batch_frontend = {
	.name = "ublk-batch",
	.complete = batch_complete,
	.cqe = batch_cqe,
	.flush = batch_flush,
	.queue_start = batch_queue_start,
	.queue_exit = batch_queue_exit,
};
