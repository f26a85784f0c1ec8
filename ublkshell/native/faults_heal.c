/* SPDX-License-Identifier: MIT */
/*
 * badblocks' heal log: the sector runs rewritten since a rule was added, so that
 * reads there succeed again (dm-dust). Written by the queue threads, read and
 * emptied by the rule writers (faults_rules.c) once no queue is inside it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "faults_int.h"

uint32_t us_heal_count(struct us_fault_area *a)
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
void us_heal_reset_if_unused(struct us_fault_area *a)
{
	uint64_t deadline;
	uint32_t i, n;

	for (i = 0; i < a->nr; i++)
		if (a->rules[a->order[i] % US_FAULT_SLOTS].action == US_FA_BAD)
			return;
	n = us_heal_count(a);
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

static int cmp_run(const void *x, const void *y)
{
	const uint64_t *a = x, *b = y;

	return a[0] < b[0] ? -1 : a[0] > b[0];
}

/* distinct sectors in the union of rule id's runs; runs is scratch for US_HEAL_ENTRIES */
uint64_t us_heal_sectors(struct us_fault_area *a, uint32_t id, uint64_t (*runs)[2])
{
	uint32_t i, n = us_heal_count(a), k = 0;
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

/*
 * The first sector of [x, y] that no run of rule id covers, y + 1 if every
 * one is covered. Runs overlap and come in any order: sweep until a pass
 * moves nothing. A run read while it grows (lo, then hi, each loaded once)
 * is a part of what it covers at the second load: never more than the truth.
 */
uint64_t us_heal_first_unhealed(struct us_fault_area *a, uint32_t id, uint64_t x, uint64_t y)
{
	uint32_t i, n = us_heal_count(a);
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
void us_heal(struct us_fault_area *a, const struct us_fault_rule *r, struct us_fault_ctr *c,
		 uint64_t x, uint64_t y)
{
	uint32_t i, n, used;
	struct us_heal_entry *e;

	/* the common case once a region is rewritten: nothing new to remember */
	if (us_heal_first_unhealed(a, r->id, x, y) > y)
		return;
	n = us_heal_count(a);
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
