/* SPDX-License-Identifier: MIT */
/*
 * A device's shared memory: counters, latency histograms, per-tag state and
 * an IO record ring per queue. The queue threads write it; the server, the
 * CLI and the FUSE tree map the same file read-only. It lives in a file on
 * tmpfs so that a killed daemon's numbers stay readable.
 *
 * Only a queue's own thread writes that queue's part: every field has a
 * single writer, and readers cope with torn multi-field views through the
 * record sequence numbers.
 */
#ifndef USHELL_RECORDS_H
#define USHELL_RECORDS_H

#include <stdint.h>

#define US_SHM_MAGIC		0x316d68736b6c6275ULL	/* "ublkshm1" */
#define US_SHM_VERSION		2
#define US_NR_OPS		6	/* read, write, flush, discard, write_zeroes, other */
#define US_OP_OTHER		5
#define US_HIST_SUB_BITS	5	/* 32 sub-buckets per power of two: ~3% precision */
#define US_HIST_BUCKETS		1088	/* exact below 32 ns, log-linear up to 2^37 ns (~137 s) */
/*
 * Record ring sizes a file may have. The bounds (with ublk's own limits on
 * queues and depth) keep every offset of the layout far below 2^64, so a
 * reader can compute it from a file's header without overflowing.
 */
#define US_REC_MIN		16
#define US_REC_MAX		16777216	/* 2^24: 1 GiB of records per queue */

struct us_op_stats {
	uint64_t	ios;
	uint64_t	bytes;
	uint64_t	errors;
	uint64_t	lat_sum_ns;
	uint64_t	lat_max_ns;
	uint64_t	pad[3];
	uint64_t	hist[US_HIST_BUCKETS];
};

/* what a tag is doing now: state 0 = waiting in the driver, 1 = being served */
struct us_tag_state {
	uint64_t	t_start_ns;
	uint64_t	start_sector;
	uint32_t	op_flags;
	uint32_t	nr_sectors;
	uint32_t	state;
	uint32_t	fault;		/* fault action applied (faults.h), 0 none */
};

/* one finished IO; 64 bytes */
struct us_rec {
	uint64_t	seq;		/* 1 + its index in the queue's stream; written last */
	uint64_t	t_start_ns;	/* CLOCK_MONOTONIC when the driver handed it over */
	uint64_t	lat_ns;		/* until we committed the result */
	uint64_t	start_sector;
	uint32_t	nr_sectors;
	uint32_t	op_flags;
	int32_t		result;
	uint16_t	tag;
	uint16_t	q_id;
	uint32_t	fault;		/* fault action applied, 0 none */
	uint32_t	pad[3];
};

struct us_shm_queue {
	uint64_t	rec_head;	/* records written so far */
	uint64_t	inflight;	/* tags being served now */
	/*
	 * What the queue cost in crossings, the unit of cost under emulation:
	 * io_uring_enter calls, CQEs reaped, completions that brought requests
	 * in, commands that took results back and the IOs those carried; and
	 * the IOs of a zero-copy device that were copied after all.
	 */
	uint64_t	enters;
	uint64_t	cqes;
	uint64_t	fetches;
	uint64_t	commits;
	uint64_t	committed;
	uint64_t	copied;
	struct us_op_stats ops[US_NR_OPS];
	/* followed by: struct us_tag_state tags[depth]; struct us_rec recs[rec_entries] */
};

struct us_shm_hdr {
	uint64_t	magic;
	uint32_t	version;
	uint32_t	hdr_size;
	uint32_t	nr_queues;
	uint32_t	depth;
	uint32_t	rec_entries;	/* power of two */
	uint32_t	hist_buckets;
	uint64_t	queue_off;	/* offset of queue 0 */
	uint64_t	queue_stride;
	int32_t		daemon_pid;
	uint32_t	dev_id;
	uint64_t	created_mono_ns;
	uint64_t	created_real_ns;
	uint64_t	fault_off;	/* offset of the struct us_fault_area (faults.h) */
	uint64_t	reserved[7];
};

#endif
