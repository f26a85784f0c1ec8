/* SPDX-License-Identifier: MIT */
/*
 * The fault rule engine (faults.h): publishing rules, matching each IO on its
 * queue thread, and the actions that need more than a different result.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "ushell.h"

/* a queue's private copy of the rules, refreshed when the area's gen moves */
struct us_fault_view {
	uint32_t	gen;
	uint32_t	nr;
	uint16_t	slot[US_FAULT_SLOTS];
	struct us_fault_rule r[US_FAULT_SLOTS];
};

#define ALWAYS		(1ULL << 32)
#define TICK_NS		20000000ULL	/* how soon a cleared hang lets its IOs go */

static uint64_t splitmix(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

/* ---- writers ---------------------------------------------------------- */

void us_fault_area_init(struct us_fault_area *a)
{
	uint64_t seed = 0;

	memset(a, 0, sizeof(*a));
	if (getrandom(&seed, sizeof(seed), GRND_NONBLOCK) != sizeof(seed))
		seed = us_now_ns();
	/* short enough to type back in when replaying a run */
	a->seed = seed % 1000000000ULL;
	a->next_id = 1;
	__atomic_store_n(&a->magic, US_FAULT_MAGIC, __ATOMIC_RELEASE);
}

struct us_fault_area *us_fault_area_of(void *shm_base)
{
	struct us_shm_hdr *h = shm_base;
	struct us_fault_area *a;

	if (!h || h->version < 2 || !h->fault_off)
		return NULL;
	a = (struct us_fault_area *)((char *)shm_base + h->fault_off);
	return __atomic_load_n(&a->magic, __ATOMIC_ACQUIRE) == US_FAULT_MAGIC ? a : NULL;
}

static void write_begin(struct us_fault_area *a)
{
	__atomic_store_n(&a->gen, a->gen + 1, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
}

static void write_end(struct us_fault_area *a)
{
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	__atomic_store_n(&a->gen, a->gen + 1, __ATOMIC_RELEASE);
}

int us_fault_add(void *shm_base, const struct us_fault_rule *r)
{
	struct us_fault_area *a = us_fault_area_of(shm_base);
	int slot;

	if (!a)
		return -ENODEV;
	if (!r->action || r->action > US_FA_BAD || r->lba_lo > r->lba_hi || r->size_lo > r->size_hi ||
	    (r->action == US_FA_DELAY && r->t_lo_ns > r->t_hi_ns) ||
	    (r->action == US_FA_BAD && r->lba_hi - r->lba_lo >= US_FAULT_BAD_SPAN))
		return -EINVAL;
	if (a->nr >= US_FAULT_SLOTS)
		return -ENOSPC;
	for (slot = 0; slot < US_FAULT_SLOTS; slot++)
		if (!a->rules[slot].id)
			break;
	if (slot == US_FAULT_SLOTS)
		return -ENOSPC;
	write_begin(a);
	a->rules[slot] = *r;
	a->rules[slot].id = a->next_id++;
	a->rules[slot].t0_ns = us_now_ns();
	__atomic_store_n(&a->ctr[slot].hits, 0, __ATOMIC_RELAXED);
	__atomic_store_n(&a->ctr[slot].left, r->count, __ATOMIC_RELAXED);
	__atomic_store_n(&a->ctr[slot].healed, 0, __ATOMIC_RELAXED);
	a->order[a->nr++] = slot;
	write_end(a);
	return a->rules[slot].id;
}

int us_fault_del(void *shm_base, uint32_t id)
{
	struct us_fault_area *a = us_fault_area_of(shm_base);
	uint32_t i, j, found = 0;

	if (!a)
		return -ENODEV;
	write_begin(a);
	for (i = j = 0; i < a->nr; i++) {
		struct us_fault_rule *r = &a->rules[a->order[i]];

		if (!id || r->id == id) {
			r->id = 0;
			found = 1;
		} else {
			a->order[j++] = a->order[i];
		}
	}
	a->nr = j;
	write_end(a);
	return found || !id ? 0 : -ENOENT;
}

void us_fault_set_seed(void *shm_base, uint64_t seed)
{
	struct us_fault_area *a = us_fault_area_of(shm_base);

	if (!a)
		return;
	write_begin(a);
	a->seed = seed;
	a->seed_gen++;
	write_end(a);
}

/* a whole copy of the rules, or -EAGAIN while a writer is at work */
static int snapshot(struct us_fault_area *a, struct us_fault_view *v)
{
	uint32_t g1 = __atomic_load_n(&a->gen, __ATOMIC_ACQUIRE), g2, i, nr;

	if (g1 & 1)
		return -EAGAIN;
	nr = __atomic_load_n(&a->nr, __ATOMIC_RELAXED);
	if (nr > US_FAULT_SLOTS)
		return -EAGAIN;
	for (i = 0; i < nr; i++) {
		uint16_t s = __atomic_load_n(&a->order[i], __ATOMIC_RELAXED) % US_FAULT_SLOTS;

		v->slot[i] = s;
		memcpy(&v->r[i], &a->rules[s], sizeof(v->r[i]));
	}
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	g2 = __atomic_load_n(&a->gen, __ATOMIC_RELAXED);
	if (g1 != g2)
		return -EAGAIN;
	v->nr = nr;
	v->gen = g1;
	return 0;
}

int us_fault_list(void *shm_base, struct us_fault_rule *rules, struct us_fault_ctr *ctrs, int max)
{
	struct us_fault_area *a = us_fault_area_of(shm_base);
	struct us_fault_view *v;
	int i, n, tries, total;

	if (!a)
		return -ENODEV;
	v = malloc(sizeof(*v));
	if (!v)
		return -ENOMEM;
	for (tries = 0; snapshot(a, v); tries++)
		if (tries > 100000) {
			free(v);
			return -EAGAIN;
		}
	n = (int)v->nr < max ? (int)v->nr : max;
	total = (int)v->nr;
	for (i = 0; i < n; i++) {
		rules[i] = v->r[i];
		ctrs[i].hits = __atomic_load_n(&a->ctr[v->slot[i]].hits, __ATOMIC_RELAXED);
		ctrs[i].left = __atomic_load_n(&a->ctr[v->slot[i]].left, __ATOMIC_RELAXED);
		ctrs[i].healed = __atomic_load_n(&a->ctr[v->slot[i]].healed, __ATOMIC_RELAXED);
	}
	free(v);
	return total;
}

/* ---- the queue side ----------------------------------------------------- */

int us_fault_attach(struct us_queue *q, void *shm_base)
{
	q->fa = us_fault_area_of(shm_base);
	if (!q->fa)
		return 0;
	q->fv = calloc(1, sizeof(*q->fv));
	if (!q->fv) {
		q->fa = NULL;
		return -ENOMEM;
	}
	/* never equal to a published gen: the first IO takes a copy */
	q->fv->gen = 1;
	return 0;
}

void us_fault_detach(struct us_queue *q)
{
	free(q->fv);
	q->fv = NULL;
	q->fa = NULL;
}

static void refresh(struct us_queue *q)
{
	uint64_t seed;

	/* a writer at work: go on with the rules we have, look again next IO */
	if (snapshot(q->fa, q->fv))
		return;
	seed = __atomic_load_n(&q->fa->seed, __ATOMIC_RELAXED);
	if (q->fa->seed_gen + 1 != q->rng_seed_gen) {
		/* each queue its own stream, the same one on every run with this seed */
		q->rng_seed_gen = q->fa->seed_gen + 1;
		q->rng = seed ^ (0x632be59bd9b4e019ULL * (uint64_t)(q->q_id + 1));
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

/* bits of sectors [lo, hi] inside the bad rule's span */
static uint64_t bad_bits(const struct us_fault_rule *r, uint64_t lo, uint64_t hi)
{
	uint64_t a = lo > r->lba_lo ? lo - r->lba_lo : 0;
	uint64_t b = (hi < r->lba_hi ? hi : r->lba_hi) - r->lba_lo;
	uint64_t n = b - a + 1;

	return (n >= 64 ? ~0ULL : ((1ULL << n) - 1)) << a;
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
			uint64_t bits = bad_bits(r, lo, hi);

			if (op == UBLK_IO_OP_WRITE || op == UBLK_IO_OP_WRITE_ZEROES) {
				/* a rewritten sector reads again, as on a disk that remapped it */
				__atomic_fetch_or(&c->healed, bits, __ATOMIC_RELAXED);
				continue;
			}
			if (op != UBLK_IO_OP_READ ||
			    !(bits & ~__atomic_load_n(&c->healed, __ATOMIC_RELAXED)))
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
	if (__atomic_load_n(&q->fa->gen, __ATOMIC_RELAXED) != q->fv->gen)
		refresh(q);
	return q->fv->nr ? match(q, tag, io) : NULL;
}

static void tag_fault(struct us_queue *q, unsigned tag, struct us_io *io)
{
	if (q->shm_tags)
		__atomic_store_n(&q->shm_tags[tag].fault, io->fault, __ATOMIC_RELAXED);
}

static void arm_timeout(struct us_queue *q, struct __kernel_timespec *ts, uint64_t ns,
			uint64_t user_data)
{
	struct io_uring_sqe *sqe = us_get_sqe(q);

	ts->tv_sec = ns / 1000000000ULL;
	ts->tv_nsec = ns % 1000000000ULL;
	io_uring_prep_timeout(sqe, ts, 0, 0);
	sqe->user_data = user_data;
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
		arm_timeout(q, &io->ts, ns, us_ud(tag, UD_DELAY));
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
	case US_FA_CORRUPT:
		if (op == UBLK_IO_OP_WRITE)
			corrupt(q, io, io->nr_sectors << 9);
		else if (op == UBLK_IO_OP_READ)
			io->fh.nolink = 1;
		return US_FAULT_PASS;
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
			arm_timeout(q, &q->tick_ts, TICK_NS, us_ud(0, UD_TICK));
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

void us_fault_tick(struct us_queue *q)
{
	int tag;

	q->tick_armed = 0;
	if (!q->fa)
		return;
	if (__atomic_load_n(&q->fa->gen, __ATOMIC_RELAXED) != q->fv->gen)
		refresh(q);
	for (tag = 0; tag < q->dev->cfg.depth && q->nr_hung; tag++) {
		struct us_io *io = &q->ios[tag];

		if (!io->fh.hung || rule_present(q, io->fh.rule_id))
			continue;
		io->fh.hung = 0;
		q->nr_hung--;
		__atomic_fetch_sub(&q->fa->hung, 1, __ATOMIC_RELAXED);
		us_start_target(q, tag);
	}
	if (q->nr_hung && !q->stopping) {
		arm_timeout(q, &q->tick_ts, TICK_NS, us_ud(0, UD_TICK));
		q->tick_armed = 1;
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
