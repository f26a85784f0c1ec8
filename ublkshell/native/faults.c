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
	uint32_t	nbad;		/* badblocks rules among them: the heal log is in use */
	uint32_t	seed_gen;
	uint64_t	seed;
	uint16_t	slot[US_FAULT_SLOTS];
	struct us_fault_rule r[US_FAULT_SLOTS];
};

#define ALWAYS		(1ULL << 32)
#define TICK_NS		20000000ULL	/* how soon a cleared hang lets its IOs go */
#define MAX_DELAY_NS	60000000000ULL	/* longer would stall `del` for as long */
#define MIN_PHASE_NS	1000000ULL
#define MAX_PHASE_NS	86400000000000ULL
#define OPS_SERVED	((1u << (UBLK_IO_OP_WRITE_ZEROES + 1)) - 1)
#define BAD_OPS		(1u << UBLK_IO_OP_READ | 1u << UBLK_IO_OP_WRITE | 1u << UBLK_IO_OP_WRITE_ZEROES)
/* how long a writer waits for queue threads to leave the heal log before it gives up emptying it */
#define HEAL_QUIESCE_NS	1000000000ULL

_Static_assert(offsetof(struct us_fault_area, busy) % 64 == 0, "busy counters share cache lines");
_Static_assert(sizeof(struct us_fault_rule) == 128, "rule layout");

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

	/* not merely non-zero: an offset the geometry does not give could point anywhere */
	if (!h || h->version < 2 || !us_shm_fault_off_ok(h))
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

/*
 * Whatever process fills a rule, the queue threads act on it: refuse what
 * they could misread (a range that ends before it starts, a tag no queue
 * has, a sector whose successor wraps) rather than trust the caller.
 */
static int rule_ok(const struct us_fault_rule *r)
{
	int has_lba = !!(r->flags & US_FM_LBA);

	if (r->action < US_FA_DELAY || r->action > US_FA_BAD)
		return 0;
	if (r->q < -1 || r->q >= (int32_t)UBLK_MAX_NR_QUEUES ||
	    r->tag < -1 || r->tag >= UBLK_MAX_QUEUE_DEPTH)
		return 0;
	if ((r->op_mask & ~OPS_SERVED) || (r->flags & ~(US_FM_FUA | US_FM_LBA)))
		return 0;
	if (has_lba ? r->lba_lo > r->lba_hi || r->lba_hi > US_FAULT_MAX_LBA :
		      r->lba_lo || r->lba_hi != UINT64_MAX)
		return 0;
	if (r->size_lo > r->size_hi || r->prob > ALWAYS || r->count < -1 || !r->count)
		return 0;
	if (r->err < 0 || r->err > 4095 || r->byte < -1 || r->byte > 4095)
		return 0;
	switch (r->action) {
	case US_FA_DELAY:
		return r->t_lo_ns <= r->t_hi_ns && r->t_hi_ns <= MAX_DELAY_NS;
	case US_FA_FLAKEY:
		return r->arg <= US_FLAKEY_DROP && r->t_lo_ns >= MIN_PHASE_NS &&
			r->t_lo_ns <= MAX_PHASE_NS && r->t_hi_ns >= MIN_PHASE_NS &&
			r->t_hi_ns <= MAX_PHASE_NS;
	case US_FA_BAD:
		/* reads fail, writes heal: a count or a chance would make healing skip writes */
		return has_lba && r->op_mask && !(r->op_mask & ~BAD_OPS) && r->count == -1 &&
			r->prob == ALWAYS;
	}
	return 1;
}

int us_fault_add_set(void *shm_base, const struct us_fault_rule *rules, int n, uint32_t *ids_out)
{
	struct us_fault_area *a = us_fault_area_of(shm_base);
	int i, slot, free_slots = 0;

	if (!a)
		return -ENODEV;
	if (n < 1 || n > US_FAULT_SLOTS)
		return -EINVAL;
	for (i = 0; i < n; i++)
		if (!rule_ok(&rules[i]))
			return -EINVAL;
	for (slot = 0; slot < US_FAULT_SLOTS; slot++)
		free_slots += !a->rules[slot].id;
	if (a->nr > US_FAULT_SLOTS || a->nr + n > US_FAULT_SLOTS || free_slots < n)
		return -ENOSPC;
	/* ids are never reused: the heal log and the records name rules by id */
	if (!a->next_id || a->next_id > US_FAULT_MAX_ID + 1 - (uint32_t)n)
		return -ERANGE;
	/* one publication: the queues see none of the set or all of it */
	write_begin(a);
	for (i = 0, slot = 0; i < n; i++, slot++) {
		while (a->rules[slot].id)
			slot++;
		a->rules[slot] = rules[i];
		a->rules[slot].id = a->next_id++;
		a->rules[slot].t0_ns = us_now_ns();
		__atomic_store_n(&a->ctr[slot].hits, 0, __ATOMIC_RELAXED);
		__atomic_store_n(&a->ctr[slot].left, rules[i].count, __ATOMIC_RELAXED);
		__atomic_store_n(&a->ctr[slot].healed, 0, __ATOMIC_RELAXED);
		__atomic_store_n(&a->ctr[slot].heal_lost, 0, __ATOMIC_RELAXED);
		a->order[a->nr++] = slot;
		if (ids_out)
			ids_out[i] = a->rules[slot].id;
	}
	write_end(a);
	return n;
}

int us_fault_add(void *shm_base, const struct us_fault_rule *r)
{
	uint32_t id;
	int rc = us_fault_add_set(shm_base, r, 1, &id);

	return rc < 0 ? rc : (int)id;
}

static uint32_t heal_count(struct us_fault_area *a)
{
	uint32_t n = __atomic_load_n(&a->heal_used, __ATOMIC_ACQUIRE);

	return n < US_HEAL_ENTRIES ? n : US_HEAL_ENTRIES;
}

/*
 * Once no badblocks rule is left, every run in the heal log belongs to a dead
 * rule: empty it so later rules have the whole log. A queue thread that still
 * matches with its copy of a deleted rule could be growing a run right now,
 * and a reused entry would then mix two rules' runs: wait until each queue
 * has left the log (pick() counts itself in busy before its last look at
 * gen), and if one does not within a second (stopped, or killed inside
 * match), keep the log: only its space is lost, never a run's meaning.
 */
static void heal_reset_if_unused(struct us_fault_area *a)
{
	uint64_t deadline;
	uint32_t i, n;

	for (i = 0; i < a->nr; i++)
		if (a->rules[a->order[i] % US_FAULT_SLOTS].action == US_FA_BAD)
			return;
	n = heal_count(a);
	if (!n)
		return;
	/* the deletion is published: whoever counts itself busy from now on sees it */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	deadline = us_now_ns() + HEAL_QUIESCE_NS;
	for (i = 0; i < US_FAULT_BUSY; i++)
		while (__atomic_load_n(&a->busy[i].n, __ATOMIC_SEQ_CST)) {
			struct timespec ts = { 0, 100000 };

			if (us_now_ns() > deadline)
				return;
			nanosleep(&ts, NULL);
		}
	for (i = 0; i < n; i++)
		__atomic_store_n(&a->heal[i].rule_id, 0, __ATOMIC_RELAXED);
	__atomic_store_n(&a->heal_used, 0, __ATOMIC_RELEASE);
}

int us_fault_del(void *shm_base, uint32_t id)
{
	struct us_fault_area *a = us_fault_area_of(shm_base);
	uint32_t i, j, found = 0;

	if (!a)
		return -ENODEV;
	write_begin(a);
	for (i = j = 0; i < a->nr && i < US_FAULT_SLOTS; i++) {
		struct us_fault_rule *r = &a->rules[a->order[i] % US_FAULT_SLOTS];

		if (!id || r->id == id) {
			r->id = 0;
			found = 1;
		} else {
			a->order[j++] = a->order[i];
		}
	}
	a->nr = j;
	write_end(a);
	if (found)
		heal_reset_if_unused(a);
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

/*
 * A whole copy of the rules and the seed, or -EAGAIN while a writer is at
 * work. v is scratch: on -EAGAIN it holds garbage, so never snapshot into
 * the view a queue is matching with.
 */
static int snapshot(struct us_fault_area *a, struct us_fault_view *v)
{
	uint32_t g1 = __atomic_load_n(&a->gen, __ATOMIC_ACQUIRE), g2, i, nr, nbad = 0;

	if (g1 & 1)
		return -EAGAIN;
	nr = __atomic_load_n(&a->nr, __ATOMIC_RELAXED);
	if (nr > US_FAULT_SLOTS)
		return -EAGAIN;
	for (i = 0; i < nr; i++) {
		uint16_t s = __atomic_load_n(&a->order[i], __ATOMIC_RELAXED) % US_FAULT_SLOTS;

		v->slot[i] = s;
		memcpy(&v->r[i], &a->rules[s], sizeof(v->r[i]));
		nbad += v->r[i].action == US_FA_BAD;
	}
	v->seed = __atomic_load_n(&a->seed, __ATOMIC_RELAXED);
	v->seed_gen = __atomic_load_n(&a->seed_gen, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	g2 = __atomic_load_n(&a->gen, __ATOMIC_RELAXED);
	if (g1 != g2)
		return -EAGAIN;
	v->nr = nr;
	v->nbad = nbad;
	v->gen = g1;
	return 0;
}

static int cmp_run(const void *x, const void *y)
{
	const uint64_t *a = x, *b = y;

	return a[0] < b[0] ? -1 : a[0] > b[0];
}

/* distinct sectors in the union of rule id's runs; runs is scratch for US_HEAL_ENTRIES */
static uint64_t healed_sectors(struct us_fault_area *a, uint32_t id, uint64_t (*runs)[2])
{
	uint32_t i, n = heal_count(a), k = 0;
	uint64_t total = 0, lo = 0, hi = 0;

	for (i = 0; i < n; i++) {
		struct us_heal_entry *e = &a->heal[i];

		if (__atomic_load_n(&e->rule_id, __ATOMIC_ACQUIRE) != id)
			continue;
		runs[k][0] = __atomic_load_n(&e->lo, __ATOMIC_RELAXED);
		runs[k][1] = __atomic_load_n(&e->hi, __ATOMIC_RELAXED);
		if (runs[k][0] <= runs[k][1])
			k++;
	}
	qsort(runs, k, sizeof(runs[0]), cmp_run);
	for (i = 0; i < k; i++) {
		if (i && runs[i][0] <= hi + 1) {
			if (runs[i][1] > hi)
				hi = runs[i][1];
			continue;
		}
		if (i)
			total += hi - lo + 1;
		lo = runs[i][0];
		hi = runs[i][1];
	}
	return k ? total + (hi - lo + 1) : 0;
}

int us_fault_list(void *shm_base, struct us_fault_rule *rules, struct us_fault_ctr *ctrs, int max)
{
	struct us_fault_area *a = us_fault_area_of(shm_base);
	struct us_fault_view *v;
	uint64_t (*runs)[2] = NULL;
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
	if (n > 0 && v->nbad) {
		runs = malloc(sizeof(*runs) * US_HEAL_ENTRIES);
		if (!runs) {
			free(v);
			return -ENOMEM;
		}
	}
	for (i = 0; i < n; i++) {
		struct us_fault_ctr *c = &a->ctr[v->slot[i]];

		rules[i] = v->r[i];
		ctrs[i].hits = __atomic_load_n(&c->hits, __ATOMIC_RELAXED);
		ctrs[i].left = __atomic_load_n(&c->left, __ATOMIC_RELAXED);
		ctrs[i].heal_lost = __atomic_load_n(&c->heal_lost, __ATOMIC_RELAXED);
		ctrs[i].healed = v->r[i].action == US_FA_BAD ? healed_sectors(a, v->r[i].id, runs) : 0;
	}
	free(runs);
	free(v);
	return total;
}

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
	if (snapshot(q->fa, v))
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

/*
 * The first sector of [x, y] that no run of rule id covers, y + 1 if every
 * one is covered. Runs overlap and come in any order: sweep until a pass
 * moves nothing. A run read while it grows (lo, then hi, each loaded once)
 * is a part of what it covers at the second load: never more than the truth.
 */
static uint64_t first_unhealed(struct us_fault_area *a, uint32_t id, uint64_t x, uint64_t y)
{
	uint32_t i, n = heal_count(a);
	int moved = 1;

	while (moved && x <= y) {
		moved = 0;
		for (i = 0; i < n && x <= y; i++) {
			struct us_heal_entry *e = &a->heal[i];
			uint64_t lo, hi;

			if (__atomic_load_n(&e->rule_id, __ATOMIC_ACQUIRE) != id)
				continue;
			lo = __atomic_load_n(&e->lo, __ATOMIC_RELAXED);
			hi = __atomic_load_n(&e->hi, __ATOMIC_RELAXED);
			/* hi below 2^63 keeps x moving up: a run's end is never trusted to be sane */
			if (lo <= x && x <= hi && hi <= US_FAULT_MAX_LBA) {
				x = hi + 1;
				moved = 1;
			}
		}
	}
	return x;
}

/*
 * Sectors [x, y] were just rewritten and the run e touches them. Each step
 * keeps e one run of rewritten sectors: hi moves to y only while x <= hi + 1
 * (what it adds is part of [x, y]), lo to x only while y + 1 >= lo. Both
 * only move outwards, so a condition true once stays true.
 */
static void grow(struct us_heal_entry *e, uint64_t x, uint64_t y)
{
	uint64_t hi = __atomic_load_n(&e->hi, __ATOMIC_RELAXED);
	uint64_t lo;

	while (hi < y && x <= hi + 1 &&
	       !__atomic_compare_exchange_n(&e->hi, &hi, y, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
		;
	lo = __atomic_load_n(&e->lo, __ATOMIC_RELAXED);
	while (lo > x && y + 1 >= lo &&
	       !__atomic_compare_exchange_n(&e->lo, &lo, x, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
		;
}

/* remember that [x, y] of rule r (within its range) was rewritten */
static void heal(struct us_fault_area *a, const struct us_fault_rule *r, struct us_fault_ctr *c,
		 uint64_t x, uint64_t y)
{
	uint32_t i, n, used;
	struct us_heal_entry *e;

	/* the common case once a region is rewritten: nothing new to remember */
	if (first_unhealed(a, r->id, x, y) > y)
		return;
	n = heal_count(a);
	for (i = 0; i < n; i++) {
		uint64_t lo, hi;

		e = &a->heal[i];
		if (__atomic_load_n(&e->rule_id, __ATOMIC_ACQUIRE) != r->id)
			continue;
		lo = __atomic_load_n(&e->lo, __ATOMIC_RELAXED);
		hi = __atomic_load_n(&e->hi, __ATOMIC_RELAXED);
		if (x <= hi + 1 && y + 1 >= lo) {
			grow(e, x, y);
			return;
		}
	}
	used = __atomic_load_n(&a->heal_used, __ATOMIC_RELAXED);
	do {
		if (used >= US_HEAL_ENTRIES) {
			/* the reads of these sectors keep failing: say so in `faults` */
			__atomic_fetch_add(&c->heal_lost, 1, __ATOMIC_RELAXED);
			return;
		}
	} while (!__atomic_compare_exchange_n(&a->heal_used, &used, used + 1, 0, __ATOMIC_ACQ_REL,
					      __ATOMIC_RELAXED));
	e = &a->heal[used];
	__atomic_store_n(&e->lo, x, __ATOMIC_RELAXED);
	__atomic_store_n(&e->hi, y, __ATOMIC_RELAXED);
	__atomic_store_n(&e->rule_id, r->id, __ATOMIC_RELEASE);
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
				heal(q->fa, r, c, x, y);
				continue;
			}
			if (op != UBLK_IO_OP_READ || first_unhealed(q->fa, r->id, x, y) > y)
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
