/* SPDX-License-Identifier: MIT */
/*
 * The fault rule engine, writers' half (faults.h): publishing, removing and listing
 * rules in a device's shared memory, from any process, under the area's seqlock.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "faults_int.h"

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
		us_heal_reset_if_unused(a);
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
int us_fault_snapshot(struct us_fault_area *a, struct us_fault_view *v)
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
	for (tries = 0; us_fault_snapshot(a, v); tries++)
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
		ctrs[i].healed = v->r[i].action == US_FA_BAD ? us_heal_sectors(a, v->r[i].id, runs) : 0;
	}
	free(runs);
	free(v);
	return total;
}

