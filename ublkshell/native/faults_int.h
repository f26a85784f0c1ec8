/* SPDX-License-Identifier: MIT */
/*
 * What the two halves of the fault engine share: faults_rules.c publishes rules
 * (any process, under the seqlock), faults.c matches them on the queue threads.
 */
#ifndef USHELL_FAULTS_INT_H
#define USHELL_FAULTS_INT_H
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
#define OPS_SERVED	(((1u << (UBLK_IO_OP_WRITE_ZEROES + 1)) - 1) | ZONE_OPS)
/* what a zoned device serves besides: a rule may match them too (names.c names them) */
#define ZONE_OPS	(1u << UBLK_IO_OP_ZONE_OPEN | 1u << UBLK_IO_OP_ZONE_CLOSE | \
			 1u << UBLK_IO_OP_ZONE_FINISH | 1u << UBLK_IO_OP_ZONE_APPEND | \
			 1u << UBLK_IO_OP_ZONE_RESET_ALL | 1u << UBLK_IO_OP_ZONE_RESET | \
			 1u << UBLK_IO_OP_REPORT_ZONES)
#define BAD_OPS		(1u << UBLK_IO_OP_READ | 1u << UBLK_IO_OP_WRITE | 1u << UBLK_IO_OP_WRITE_ZEROES)
/* how long a writer waits for queue threads to leave the heal log before it gives up emptying it */
#define HEAL_QUIESCE_NS	1000000000ULL

_Static_assert(offsetof(struct us_fault_area, busy) % 64 == 0, "busy counters share cache lines");
_Static_assert(sizeof(struct us_fault_rule) == 128, "rule layout");

static inline uint64_t splitmix(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}


/* a whole copy of the rules and the seed, or -EAGAIN while a writer is at work (faults_rules.c) */
int us_fault_snapshot(struct us_fault_area *a, struct us_fault_view *v);
/* faults_heal.c: badblocks' heal log */
/* entries of the heal log in use */
uint32_t us_heal_count(struct us_fault_area *a);
/* empty the log once no badblocks rule is left and no queue is inside it (writers, under the seqlock) */
void us_heal_reset_if_unused(struct us_fault_area *a);
/* distinct sectors in the union of rule id's runs; runs is scratch for US_HEAL_ENTRIES */
uint64_t us_heal_sectors(struct us_fault_area *a, uint32_t id, uint64_t (*runs)[2]);
/* the first sector of x..y that rule id has not seen rewritten, or y + 1 */
uint64_t us_heal_first_unhealed(struct us_fault_area *a, uint32_t id, uint64_t x, uint64_t y);
/* a write of x..y under badblocks rule r: remember it healed (queue threads) */
void us_heal(struct us_fault_area *a, const struct us_fault_rule *r, struct us_fault_ctr *c,
	     uint64_t x, uint64_t y);
#endif
