/* SPDX-License-Identifier: MIT */
/*
 * Fault rules, in the device's shared memory next to its statistics.
 *
 * Writers (the CLI, the server, the FUSE tree, the daemon) change the rules
 * under an flock of the shared file, through the us_fault_* calls, which
 * publish with a sequence count: odd while a change is being written. Each
 * queue thread keeps a private copy of the rules and refreshes it when the
 * count moves, so matching never reads a half-written rule and a device
 * without rules pays one load per IO. Hit counters and remaining counts are
 * shared by every queue and updated atomically.
 *
 * badblocks: which listed sectors were rewritten lives in the heal log, a
 * fixed array of runs {rule id, lo, hi} that the queue threads claim and
 * grow lock-free (any thread of any process may die at any instruction, so
 * nothing here is a lock). A run only ever grows and only ever covers
 * sectors that were written, so a reader that sees a run mid-change sees
 * less than the truth, never more. When the log is full a rewrite is counted
 * in the rule's heal_lost instead: its sectors keep failing reads.
 */
#ifndef USHELL_FAULTS_H
#define USHELL_FAULTS_H

#include <stdint.h>

#define US_FAULT_MAGIC		0x33746c7561666b75ULL	/* "ukfault3": LBA flag, heal log, pc_failed, write log */
#define US_FAULT_SLOTS		256
/* a record's fault field holds action | id << 8 in 32 bits */
#define US_FAULT_MAX_ID		0xffffff
/* sectors are below 2^63: `hi + 1` and byte offsets never wrap */
#define US_FAULT_MAX_LBA	0x7fffffffffffffffULL
#define US_HEAL_ENTRIES		8192	/* runs of rewritten bad sectors, every rule together */
#define US_FAULT_BUSY		64	/* heal log users, counted per queue id modulo this */

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
	/* badblocks, from us_fault_list: distinct sectors rewritten (the union of the rule's runs) */
	uint64_t	healed;
	uint64_t	heal_lost;	/* badblocks: rewrites the full heal log could not remember */
};

/* a run of rewritten sectors of one badblocks rule */
struct us_heal_entry {
	uint32_t	rule_id;	/* 0 until lo and hi are written: published last */
	uint32_t	pad;
	uint64_t	lo;		/* only ever decreases */
	uint64_t	hi;		/* only ever increases */
};

/* queue threads inside the heal log; one cache line each, they change every IO */
struct us_fault_busy {
	uint32_t	n;
	uint32_t	pad[15];
};

/*
 * The device's --log-writes log, seen from outside the daemon: its daemon
 * copies the status in a few times a second, and takes mark requests here.
 * A mark's writer holds the file's flock from writing mark_name until
 * mark_done reaches its mark_req, so one request is in the box at a time.
 */
#define US_LW_MARK_MAX		512
struct us_lw_box {
	uint32_t	on;		/* 1 while the daemon has a log open */
	int32_t		error;		/* positive errno once logging stopped (ENOBUFS: over the memory bound) */
	uint64_t	entries;	/* counted by the log's super block */
	uint64_t	log_bytes;
	uint64_t	held_bytes;	/* write data in the daemon's memory, waiting for a flush or the disk */
	uint64_t	held_max;
	uint64_t	limit;		/* the bound on held_bytes */
	uint32_t	marks;
	int32_t		mark_err;	/* the daemon's answer to mark_req: 0 or a positive errno */
	uint64_t	mark_index;	/* that mark's entry number in the log (from 0) */
	uint64_t	mark_req;	/* bumped by a writer after mark_name */
	uint64_t	mark_done;	/* the last mark_req the daemon answered */
	char		mark_name[US_LW_MARK_MAX];	/* NUL-terminated */
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
	uint32_t	pc_failed;	/* unflushed writes whose undo failed: old, new or mixed data */
	int32_t		pc_errno;	/* the first error of those undos (positive), 0 none */
	uint32_t	heal_used;	/* heal[] entries claimed; may run ahead of those published */
	uint32_t	pad0;
	uint64_t	reserved[6];	/* the arrays below start on a cache line */
	uint16_t	order[US_FAULT_SLOTS];
	struct us_fault_rule rules[US_FAULT_SLOTS];
	struct us_fault_ctr ctr[US_FAULT_SLOTS];
	struct us_fault_busy busy[US_FAULT_BUSY];
	struct us_heal_entry heal[US_HEAL_ENTRIES];
	struct us_lw_box lw;
};

#endif
