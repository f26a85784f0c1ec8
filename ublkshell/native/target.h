/* SPDX-License-Identifier: MIT */
/*
 * The target contract. A target is written once and serves both transports:
 * the ublk front end (ring.c) and the FUSE front end (fuse_transport.c) hand
 * it the same struct us_io, on a queue thread that owns one io_uring, through
 * the one pipeline in pipeline.c:
 *
 *   record begin -> fault rules -> [power-cut log] -> queue_io ... io_done
 *                -> [fault finish] -> [power-cut log] -> record end -> complete
 *
 * Adding a target: one file target_NAME.c defining a struct us_target_type,
 * and one line in targets.c's table. build.py compiles every target_*.c;
 * Python reads the table (us_target_info) for names, options and flags.
 *
 * Units: a us_io is in 512-byte sectors whatever the device's block size.
 * io->buf holds up to the device's max_io_bytes: a WRITE's data on entry, a
 * READ's data on exit; except when io->zc is set (a zero-copy device, and only
 * for targets whose info.flags have US_TGT_F_ZERO_COPY): then the data is the
 * request's own pages, registered as the ring's fixed buffer us_zc_slot(q,
 * tag), to be moved with READ_FIXED/WRITE_FIXED at an offset into it
 * (ublk_buffers.c). A target that wants the data in buf after all calls
 * us_io_bounce() first. Results: the byte count for READ and WRITE, 0 for
 * FLUSH, DISCARD and WRITE_ZEROES (a byte count overflows at 2 GiB), or a
 * negative errno. US_QUEUED means "SQEs of this tag are in flight".
 *
 * Hooks (every hook runs on exactly one thread per call; none may block for
 * long except where said):
 *
 *   info        required. Name, help, options, flags, SQEs per IO (below).
 *
 *   init        optional. Called once per device by us_dev_start (or the
 *               FUSE start) on the caller's thread, before any queue thread
 *               runs. Checks the configuration (a loop target without a
 *               backing fd is -EINVAL) and may set d->tgt_data. Returns 0 or
 *               -errno; nothing else runs after an error (deinit neither).
 *
 *   queue_io    required. A new IO on the tag. Called on the tag's queue
 *               thread, the only thread that touches that queue's ring and
 *               ios. Either answers at once (the result) or prepares SQEs
 *               with us_get_sqe() (user_data us_ud(tag, UD_TGT), counting
 *               q->tgt_inflight) and returns US_QUEUED; it must never queue
 *               more than info.sqes_per_io SQEs for one tag at a time, which
 *               is what the ring was sized for. It may block only as long as
 *               a copy within RAM takes (mem): everything else goes on the
 *               ring, or the whole queue waits.
 *
 *   io_done     required if queue_io ever returns US_QUEUED. One of the
 *               tag's SQEs completed with res: the result, or US_QUEUED
 *               after queueing more (short IO, retries). Same thread.
 *
 *   deinit      optional. After every queue thread has exited (their rings
 *               gone, so no SQE of the target is in flight): free
 *               d->tgt_data. Caller's thread.
 *
 * A target may call us_link_commit() behind its last SQE when the result is
 * known in advance (front ends that cannot link ignore it), and must not
 * keep per-IO state anywhere but the us_io (io->attempt, io->done) and its
 * own per-tag arrays: a delayed or hung IO may start long after it arrived.
 */
#ifndef USHELL_TARGET_H
#define USHELL_TARGET_H

#include "ushell_api.h"

struct us_queue;
struct us_io;
struct us_dev;

struct us_target_type {
	struct us_target_info info;
	int (*init)(struct us_dev *d);
	int (*queue_io)(struct us_queue *q, unsigned tag, struct us_io *io);
	int (*io_done)(struct us_queue *q, unsigned tag, struct us_io *io, int res);
	void (*deinit)(struct us_dev *d);
};

/* the table (targets.c), NULL-terminated; a device's cfg.target is an index into it */
extern const struct us_target_type *const us_targets[];
const struct us_target_type *us_target_type(int idx);

/* SQEs per IO the ring is sized for when a target asks for more (bounded by io_uring's limits) */
#define US_MAX_SQES_PER_IO	4

#endif
