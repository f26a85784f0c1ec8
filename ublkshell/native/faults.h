/* SPDX-License-Identifier: MIT */
/*
 * Fault rules, in the device's shared memory next to its statistics.
 *
 * Writers (the CLI, the server, the FUSE tree, the daemon) change the rules
 * under an flock of the shared file, through the us_fault_* calls, which
 * publish with a sequence count: odd while a change is being written. Each
 * queue thread keeps a private copy of the rules and refreshes it when the
 * count moves, so matching never reads a half-written rule and a device
 * without rules pays one load per IO. Hit counters, remaining counts and
 * healed bad sectors are shared by every queue and updated atomically.
 */
#ifndef USHELL_FAULTS_H
#define USHELL_FAULTS_H

#include <stdint.h>

#define US_FAULT_MAGIC		0x31746c7561666b75ULL	/* "ukfault1" */
#define US_FAULT_SLOTS		256
#define US_FAULT_BAD_SPAN	64	/* sectors one badblocks rule can cover (one bit each) */

/* actions; a record's and a tag's fault field is action | rule id << 8 */
#define US_FA_DELAY		1
#define US_FA_FAIL		2
#define US_FA_DROP		3
#define US_FA_CORRUPT		4
#define US_FA_TORN		5
#define US_FA_HANG		6
#define US_FA_FLAKEY		7
#define US_FA_BAD		8

/* rule->flags */
#define US_FM_FUA		1	/* the IO must carry FUA */
#define US_FM_LBA		2	/* lba_lo..lba_hi is a range the IO must overlap (never a FLUSH) */

/* rule->arg for flakey: what the down phase does */
#define US_FLAKEY_ERROR		0
#define US_FLAKEY_DROP		1

/* 128 bytes. Unset match fields match every IO: q/tag -1, op_mask 0, full ranges. */
struct us_fault_rule {
	uint32_t	id;		/* 0: free slot */
	uint32_t	action;
	int32_t		q;
	int32_t		tag;
	uint32_t	op_mask;	/* bit (1 << UBLK_IO_OP_*) */
	uint32_t	flags;		/* US_FM_* */
	uint64_t	lba_lo;		/* US_FM_LBA: sectors, inclusive; an IO overlapping them matches */
	uint64_t	lba_hi;		/* without US_FM_LBA: 0 and UINT64_MAX */
	uint64_t	size_lo;	/* bytes, inclusive */
	uint64_t	size_hi;
	uint64_t	prob;		/* chance in 2^-32 units; >= 2^32 always */
	int64_t		count;		/* applications allowed, -1 unlimited */
	int32_t		err;		/* errno reported (positive); torn: 0 = report success */
	uint32_t	arg;		/* torn: sectors kept (0: half); flakey: US_FLAKEY_* */
	int64_t		byte;		/* corrupt: offset into the first matching sector, -1 random */
	uint64_t	t_lo_ns;	/* delay: uniform in [t_lo, t_hi]; flakey: up time */
	uint64_t	t_hi_ns;	/* flakey: down time */
	uint64_t	t0_ns;		/* CLOCK_MONOTONIC when added: flakey's phase origin */
	uint64_t	pad[2];
};

struct us_fault_ctr {
	uint64_t	hits;
	int64_t		left;		/* applications left (count rules) */
	uint64_t	healed;		/* badblocks: bit i set = sector lba_lo + i rewritten */
	uint64_t	pad;
};

struct us_fault_area {
	uint64_t	magic;
	uint32_t	gen;		/* odd while a writer changes rules or seed */
	uint32_t	nr;		/* rules in order[], first match wins */
	uint64_t	seed;		/* the probability and random-choice generator's seed */
	uint32_t	next_id;
	uint32_t	hung;		/* IOs withheld now, every queue */
	uint32_t	seed_gen;	/* bumped by every seed write: queues restart their sequence */
	uint32_t	powercut_keep;	/* powercut request: chance (ppm) to keep each unflushed write */
	/* powercut outcome, written by the daemon before it dies */
	uint32_t	pc_dropped;	/* unflushed writes undone */
	uint32_t	pc_kept;	/* unflushed writes left in place */
	uint64_t	pc_dropped_bytes;
	uint64_t	pc_done;	/* 1 + the outcome fields are final */
	uint16_t	order[US_FAULT_SLOTS];
	struct us_fault_rule rules[US_FAULT_SLOTS];
	struct us_fault_ctr ctr[US_FAULT_SLOTS];
};

#endif
