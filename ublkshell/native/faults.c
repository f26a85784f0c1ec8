/* SPDX-License-Identifier: MIT */
/*
 * The fault rule engine, queue side (faults.h): matching each IO on its queue
 * thread against its copy of the rules, and the actions that need more than a
 * different result. The rules are published by faults_rules.c.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "faults_int.h"

/* ---- the queue side ----------------------------------------------------- */

static uint32_t *busy_of(struct us_queue *q)
{
	return &q->fa->busy[(uint32_t)q->q_id % US_FAULT_BUSY].n;
}

int us_fault_attach(struct us_queue *q, void *shm_base)
{
	q->fa = us_fault_area_of(shm_base);
	if (!q->fa)
		return 0;
	q->fv = calloc(1, sizeof(*q->fv));
	q->fv_next = calloc(1, sizeof(*q->fv_next));
	if (!q->fv || !q->fv_next) {
		us_fault_detach(q);
		return -ENOMEM;
	}
	/*
	 * No thread of this queue id runs now (a recovering daemon starts after
	 * its predecessor died): a count it left inside the heal log is stale.
	 */
	__atomic_store_n(busy_of(q), 0, __ATOMIC_RELAXED);
	/* never equal to a published gen: the first IO takes a copy */
	q->fv->gen = 1;
	return 0;
}

void us_fault_detach(struct us_queue *q)
{
	free(q->fv);
	free(q->fv_next);
	q->fv = q->fv_next = NULL;
	q->fa = NULL;
}

static void refresh(struct us_queue *q)
{
	struct us_fault_view *v = q->fv_next;

	/* a writer at work: go on with the rules we have, look again next IO */
	if (us_fault_snapshot(q->fa, v))
		return;
	q->fv_next = q->fv;
	q->fv = v;
	if (v->seed_gen + 1 != q->rng_seed_gen) {
		/* each queue its own stream, the same one on every run with this seed */
		q->rng_seed_gen = v->seed_gen + 1;
		q->rng = v->seed ^ (0x632be59bd9b4e019ULL * (uint64_t)(q->q_id + 1));
		if (!q->rng)
			q->rng = 1;
	}
}

static uint64_t rng(struct us_queue *q)
{
	return splitmix(&q->rng);
}

static int take_one(struct us_fault_ctr *c)
{
	int64_t left = __atomic_load_n(&c->left, __ATOMIC_RELAXED);

	while (left > 0)
		if (__atomic_compare_exchange_n(&c->left, &left, left - 1, 0, __ATOMIC_RELAXED,
						__ATOMIC_RELAXED))
			return 1;
	return 0;
}




/* the first rule that applies to this IO, or NULL; counters move */
static const struct us_fault_rule *match(struct us_queue *q, unsigned tag, struct us_io *io)
{
	struct us_fault_view *v = q->fv;
	unsigned op = io->op_flags & 0xff;
	uint64_t lo = io->start_sector, hi, bytes = (uint64_t)io->nr_sectors << 9;
	uint32_t i;

	hi = lo + (io->nr_sectors ? io->nr_sectors - 1 : 0);
	for (i = 0; i < v->nr; i++) {
		const struct us_fault_rule *r = &v->r[i];
		struct us_fault_ctr *c = &q->fa->ctr[v->slot[i]];

		if ((r->q >= 0 && r->q != q->q_id) || (r->tag >= 0 && (unsigned)r->tag != tag))
			continue;
		if (r->op_mask && !(op < 32 && (r->op_mask & (1u << op))))
			continue;
		if ((r->flags & US_FM_FUA) && !(io->op_flags & UBLK_IO_F_FUA))
			continue;
		if (hi < r->lba_lo || lo > r->lba_hi)
			continue;
		/* a FLUSH carries no range (its sector 0 is no sector): LBA rules leave it alone */
		if (op == UBLK_IO_OP_FLUSH && (r->flags & US_FM_LBA))
			continue;
		if (bytes < r->size_lo || bytes > r->size_hi)
			continue;
		if (r->action == US_FA_BAD) {
			uint64_t x = lo > r->lba_lo ? lo : r->lba_lo;
			uint64_t y = hi < r->lba_hi ? hi : r->lba_hi;

			if (op == UBLK_IO_OP_WRITE || op == UBLK_IO_OP_WRITE_ZEROES) {
				/* a rewritten sector reads again, as on a disk that remapped it */
				us_heal(q->fa, r, c, x, y);
				continue;
			}
			if (op != UBLK_IO_OP_READ || us_heal_first_unhealed(q->fa, r->id, x, y) > y)
				continue;
		}
		if (r->action == US_FA_FLAKEY) {
			uint64_t period = r->t_lo_ns + r->t_hi_ns;

			if (!period || (us_now_ns() - r->t0_ns) % period < r->t_lo_ns)
				continue;	/* up */
			/* dm-flakey's drop_writes lets reads through */
			if (r->arg == US_FLAKEY_DROP && op == UBLK_IO_OP_READ)
				continue;
		}
		if (r->prob < ALWAYS && (rng(q) >> 32) >= r->prob)
			continue;
		if (r->count >= 0 && !take_one(c))
			continue;
		__atomic_fetch_add(&c->hits, 1, __ATOMIC_RELAXED);
		return r;
	}
	return NULL;
}

static const struct us_fault_rule *pick(struct us_queue *q, unsigned tag, struct us_io *io)
{
	const struct us_fault_rule *r;
	uint32_t *busy;

	if (__atomic_load_n(&q->fa->gen, __ATOMIC_RELAXED) != q->fv->gen)
		refresh(q);
	if (!q->fv->nr)
		return NULL;
	if (!q->fv->nbad)
		return match(q, tag, io);
	/*
	 * Badblocks rules use the heal log, which a writer empties once the last
	 * of them is deleted. Count ourselves in before the last look at gen (the
	 * writer publishes, then looks at the counts): either we see the
	 * deletion here, or the writer sees us and waits until we are out.
	 */
	busy = busy_of(q);
	__atomic_fetch_add(busy, 1, __ATOMIC_SEQ_CST);
	if (__atomic_load_n(&q->fa->gen, __ATOMIC_SEQ_CST) != q->fv->gen)
		refresh(q);
	r = match(q, tag, io);
	__atomic_fetch_sub(busy, 1, __ATOMIC_RELEASE);
	return r;
}

static void tag_fault(struct us_queue *q, unsigned tag, struct us_io *io)
{
	if (q->shm_tags)
		__atomic_store_n(&q->shm_tags[tag].fault, io->fault, __ATOMIC_RELAXED);
}

/* 0, or -EBUSY when the ring has no SQE even after submitting what it holds */
static int arm_timeout(struct us_queue *q, struct __kernel_timespec *ts, uint64_t ns,
		       uint64_t user_data)
{
	struct io_uring_sqe *sqe = us_get_sqe(q);

	if (!sqe)
		return -EBUSY;
	ts->tv_sec = ns / 1000000000ULL;
	ts->tv_nsec = ns % 1000000000ULL;
	io_uring_prep_timeout(sqe, ts, 0, 0);
	sqe->user_data = user_data;
	return 0;
}

static int write_like(unsigned op)
{
	return op == UBLK_IO_OP_WRITE || op == UBLK_IO_OP_WRITE_ZEROES || op == UBLK_IO_OP_DISCARD ||
		op == UBLK_IO_OP_FLUSH;
}

/* acknowledge without doing: what a write cache that loses its content says */
static int dropped(struct us_io *io)
{
	return (io->op_flags & 0xff) == UBLK_IO_OP_WRITE ? (int)(io->nr_sectors << 9) : 0;
}

static void corrupt(struct us_queue *q, struct us_io *io, unsigned len)
{
	uint64_t off;

	if (!len)
		return;
	if (io->fh.byte < 0) {
		off = rng(q) % len;
	} else {
		uint64_t first = io->fh.lba_lo > io->start_sector ? io->fh.lba_lo : io->start_sector;

		off = ((first - io->start_sector) << 9) + (uint64_t)io->fh.byte;
		if (off >= len)
			off = len - 1;
	}
	io->buf[off] ^= 0xff;
	/* the null target re-zeroes only what it knows is dirty */
	if (io->dirty < len)
		io->dirty = len;
}

/* the rule could not be carried out after all: the record and inflight must not name it */
static void unmark(struct us_queue *q, unsigned tag, struct us_io *io)
{
	io->fault = 0;
	memset(&io->fh, 0, sizeof(io->fh));
	tag_fault(q, tag, io);
}

static void unhang(struct us_queue *q, struct us_io *io)
{
	io->fh.hung = 0;
	q->nr_hung--;
	__atomic_fetch_sub(&q->fa->hung, 1, __ATOMIC_RELAXED);
}

int us_fault_start(struct us_queue *q, unsigned tag, struct us_io *io)
{
	const struct us_fault_rule *r;
	unsigned op = io->op_flags & 0xff;
	uint64_t ns;

	if (!q->fa)
		return US_FAULT_PASS;
	memset(&io->fh, 0, sizeof(io->fh));
	if (!(r = pick(q, tag, io)))
		return US_FAULT_PASS;
	io->fault = r->action | r->id << 8;
	io->fh.rule_id = r->id;
	io->fh.action = r->action;
	io->fh.arg = r->arg;
	io->fh.err = r->err;
	io->fh.byte = r->byte;
	io->fh.lba_lo = r->lba_lo;
	tag_fault(q, tag, io);

	switch (r->action) {
	case US_FA_DELAY:
		ns = r->t_lo_ns;
		if (r->t_hi_ns > r->t_lo_ns)
			ns += rng(q) % (r->t_hi_ns - r->t_lo_ns + 1);
		/*
		 * No SQE even after a submit (the kernel refused the submit): waiting
		 * for a timeout never queued would lose the tag, so serve it undelayed.
		 */
		if (arm_timeout(q, &io->ts, ns, us_ud(tag, UD_DELAY))) {
			unmark(q, tag, io);
			return US_FAULT_PASS;
		}
		q->tgt_inflight++;
		return US_QUEUED;
	case US_FA_FAIL:
	case US_FA_BAD:
		return -(r->err ? r->err : EIO);
	case US_FA_DROP:
		return write_like(op) ? dropped(io) : US_FAULT_PASS;
	case US_FA_FLAKEY:
		if (r->arg == US_FLAKEY_DROP)
			return write_like(op) ? dropped(io) : US_FAULT_PASS;
		return -(r->err ? r->err : EIO);
	case US_FA_CORRUPT: {
		/* zero copy: the data to edit must pass through here (a READ's on its way out) */
		int err = us_io_bounce(q, tag, io);

		if (err)
			return err;
		if (op == UBLK_IO_OP_WRITE)
			corrupt(q, io, io->nr_sectors << 9);
		else if (op == UBLK_IO_OP_READ)
			io->fh.nolink = 1;
		return US_FAULT_PASS;
	}
	case US_FA_TORN: {
		unsigned keep = r->arg ? r->arg : io->nr_sectors / 2;

		if (op != UBLK_IO_OP_WRITE || keep >= io->nr_sectors)
			return US_FAULT_PASS;
		io->fh.orig_sectors = io->nr_sectors;
		io->fh.nolink = 1;
		if (!keep)
			return r->err ? -r->err : (int)(io->nr_sectors << 9);
		io->nr_sectors = keep;
		return US_FAULT_PASS;
	}
	case US_FA_HANG:
		io->fh.hung = 1;
		q->nr_hung++;
		__atomic_fetch_add(&q->fa->hung, 1, __ATOMIC_RELAXED);
		if (!q->tick_armed) {
			/* without the timer nothing would ever let this IO go: serve it */
			if (arm_timeout(q, &q->tick_ts, TICK_NS, us_ud(0, UD_TICK))) {
				unhang(q, io);
				unmark(q, tag, io);
				return US_FAULT_PASS;
			}
			q->tick_armed = 1;
		}
		return US_QUEUED;
	}
	return US_FAULT_PASS;
}

int us_fault_finish(struct us_queue *q, unsigned tag, struct us_io *io, int r)
{
	(void)tag;
	switch (io->fh.action) {
	case US_FA_CORRUPT:
		if ((io->op_flags & 0xff) == UBLK_IO_OP_READ && r > 0)
			corrupt(q, io, (unsigned)r);
		break;
	case US_FA_TORN:
		if (io->fh.orig_sectors) {
			io->nr_sectors = io->fh.orig_sectors;
			io->fh.orig_sectors = 0;
			if (r >= 0)
				r = io->fh.err ? -io->fh.err : (int)(io->nr_sectors << 9);
		}
		break;
	}
	return r;
}

static int rule_present(struct us_queue *q, uint32_t id)
{
	uint32_t i;

	for (i = 0; i < q->fv->nr; i++)
		if (q->fv->r[i].id == id)
			return 1;
	return 0;
}

static void release_hung(struct us_queue *q, int all)
{
	int tag;

	for (tag = 0; tag < q->dev->cfg.depth && q->nr_hung; tag++) {
		struct us_io *io = &q->ios[tag];

		if (!io->fh.hung || (!all && rule_present(q, io->fh.rule_id)))
			continue;
		unhang(q, io);
		us_start_target(q, tag);
	}
}

void us_fault_tick(struct us_queue *q)
{
	q->tick_armed = 0;
	if (!q->fa)
		return;
	if (__atomic_load_n(&q->fa->gen, __ATOMIC_RELAXED) != q->fv->gen)
		refresh(q);
	release_hung(q, 0);
	if (q->nr_hung && !q->stopping) {
		if (!arm_timeout(q, &q->tick_ts, TICK_NS, us_ud(0, UD_TICK)))
			q->tick_armed = 1;
		else
			/* no timer, so no later look: let the withheld IO go rather than keep it forever */
			release_hung(q, 1);
	}
}

/* ---- tests -------------------------------------------------------------- */

uint32_t us_fault_eval(void *shm_base, int q_id, unsigned tag, uint32_t op_flags,
		       uint64_t sector, uint32_t nr_sectors)
{
	static __thread struct us_queue q;
	static __thread uint64_t created;
	struct us_io io;
	const struct us_fault_rule *r;
	uint64_t born = ((struct us_shm_hdr *)shm_base)->created_mono_ns;

	/* a new file may be mapped where the last one was: its creation time tells them apart */
	if (q.fa != us_fault_area_of(shm_base) || q.q_id != q_id || created != born) {
		created = born;
		us_fault_detach(&q);
		memset(&q, 0, sizeof(q));
		q.q_id = q_id;
		if (us_fault_attach(&q, shm_base) || !q.fa)
			return 0;
	}
	memset(&io, 0, sizeof(io));
	io.op_flags = op_flags;
	io.start_sector = sector;
	io.nr_sectors = nr_sectors;
	r = pick(&q, tag, &io);
	return r ? r->action | r->id << 8 : 0;
}
