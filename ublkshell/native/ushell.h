/* SPDX-License-Identifier: MIT */
/*
 * The native side of ublkshell: control commands and the per-queue ring loop.
 * Python (cffi) sees only what ushell_api.h declares; this header is the
 * contract between the ring loop and the targets.
 */
#ifndef USHELL_H
#define USHELL_H

#include <stdint.h>
#include <pthread.h>
#include <stddef.h>
#include <string.h>
#include <time.h>
#include <liburing.h>
#include "uapi.h"
#include "records.h"
#include "faults.h"
#include "ushell_api.h"
#include "target.h"

/* a target's queue_io/io_done returns this when it left IO in flight on the ring */
#define US_QUEUED	(-0x7fffffff)

/* us_fault_start: no fault stops this IO, hand it to the target */
#define US_FAULT_PASS	(-0x7ffffffe)

/* sqe->user_data: tag in bits 0-15, kind in 16-23 */
/*
 * UD_LINKED: a COMMIT_AND_FETCH linked behind the target SQE that produces its result.
 * UD_DELAY: a delay fault's timeout for that tag; UD_TICK: the queue's timer that
 * lets go of hung IOs once their rule is cleared. UD_FE: the front end's own
 * (the FUSE front end's doorbell).
 */
enum us_ud_kind { UD_CMD = 0, UD_TGT = 1, UD_STOP = 2, UD_LINKED = 3, UD_DELAY = 4, UD_TICK = 5, UD_FE = 6 };

static inline uint64_t us_ud(unsigned tag, unsigned kind)
{
	return (uint64_t)tag | ((uint64_t)kind << 16);
}
static inline unsigned us_ud_tag(uint64_t ud) { return ud & 0xffff; }
static inline unsigned us_ud_kind(uint64_t ud) { return (ud >> 16) & 0xff; }

/* what an IO's fault rule asked for, copied: the rule may change while the IO waits */
struct us_fault_hit {
	uint32_t	rule_id;
	uint32_t	action;
	uint32_t	arg;
	int32_t		err;
	int64_t		byte;
	uint64_t	lba_lo;
	uint32_t	orig_sectors;	/* torn: what the request asked for */
	uint8_t		hung;
	uint8_t		nolink;		/* the result or data changes after the target's IO */
};

struct us_io {
	char		*buf;
	/* the descriptor is copied out: the driver may rewrite it after commit */
	uint32_t	op_flags;
	uint32_t	nr_sectors;
	uint64_t	start_sector;
	uint32_t	done;		/* bytes moved so far (short IO is resubmitted) */
	uint32_t	attempt;	/* target specific retry state */
	uint32_t	dirty;		/* null target: bytes of write data left in buf */
	uint32_t	fault;		/* fault action applied to this IO, 0 none */
	uint64_t	t_start_ns;
	/*
	 * linked: a commit carrying link_expect is queued behind the target SQE;
	 * it runs only if that SQE returns exactly link_expect (io_uring cancels
	 * the rest of a chain on a failed or short head).
	 */
	int32_t		link_expect;
	uint8_t		linked;
	/* zc: the data is the request's own pages, fixed buffer slot = tag, at offset 0 (ublk_buffers.c) */
	uint8_t		zc;
	/* bounce: a zero-copy device's IO served from buf; a READ's data goes out before the commit */
	uint8_t		bounce;
	struct us_fault_hit fh;
	struct __kernel_timespec ts;	/* delay fault: read by the kernel at submit */
	void		*wlog;		/* powercut: this write's entry in the write log */
	/* zoned: where a ZONE_APPEND landed, committed in the command's zone_append_lba */
	uint64_t	append_lba;
	/* user copy: reading a WRITE's data from /dev/ublkcN failed with this (-errno), 0 none */
	int32_t		copy_err;
	uint32_t	flush_mark;	/* powercut: this FLUSH's number */
	void		*lw;		/* --log-writes: this IO's block, from target start to io_end */
};

struct us_queue;

/*
 * A front end brings requests in and takes results back out: ring.c (ublk)
 * and fuse_transport.c (FUSE). The pipeline (pipeline.c) calls these on the
 * queue thread.
 */
struct us_frontend {
	const char *name;
	/* the IO's final result: hand it back to whoever asked (the tag is then the front end's) */
	void (*complete)(struct us_queue *q, unsigned tag, int result);
	/* optional: queue that completion linked behind head, to run if head returns result */
	void (*link)(struct us_queue *q, unsigned tag, struct io_uring_sqe *head, int result);
	/* a CQE of one of the front end's own kinds (UD_CMD, UD_LINKED, UD_STOP, UD_FE) */
	void (*cqe)(struct us_queue *q, const struct io_uring_cqe *cqe);
	/*
	 * optional: before each submit, send what complete() gathered (batched
	 * commits). Returns how many CQEs those commands will post that bring no
	 * work, so that the turn waits past them instead of waking for them.
	 */
	unsigned (*flush)(struct us_queue *q);
	/* ublk only: after us_queue_init, the queue's own state and its first commands; 0 or -errno */
	int (*queue_start)(struct us_queue *q);
	/* ublk only: free what queue_start made, after the ring is gone */
	void (*queue_exit)(struct us_queue *q);
};

/* the ring's cost, counted by the queue thread and published to shared memory each turn */
struct us_ring_counters {
	uint64_t	enters;
	uint64_t	cqes;
	uint64_t	fetches;
	uint64_t	commits;
	uint64_t	committed;
	uint64_t	copied;		/* zero copy: IOs that took the copy path */
};

extern const struct us_target_type us_target_mem, us_target_loop;
/* loop's completion, which mem's zero-copy path shares */
int us_loop_io_done(struct us_queue *q, unsigned tag, struct us_io *io, int res);

struct us_dev;

struct us_queue {
	struct us_dev	*dev;
	int		q_id;
	int		cpu;
	pthread_t	thr;
	struct io_uring	ring;
	int		ring_ok;
	int		fixed_files;	/* cdev is fixed file 0, the backing fd 1 */
	const struct ublksrv_io_desc *iods;
	size_t		iods_len;
	char		*bufs;
	size_t		bufs_len;
	struct us_io	*ios;
	void		*fe_q;		/* the front end's per-queue state */
	struct us_ring_counters ctr;
	unsigned	cmd_inflight;
	unsigned	tgt_inflight;
	int		stopping;
	int		error;
	/* this queue's part of the device's shared memory (NULL: not recording) */
	struct us_shm_queue *shmq;
	struct us_tag_state *shm_tags;
	struct us_rec	*shm_recs;
	uint32_t	rec_entries;
	/* fault rules: the shared area and this queue's copy (NULL: none) */
	struct us_fault_area *fa;
	struct us_fault_view *fv;
	struct us_fault_view *fv_next;	/* where the next copy is taken: fv stays whole if it fails */
	uint64_t	rng;
	uint32_t	rng_seed_gen;	/* the area's seed_gen + 1 this rng started from, 0 none */
	unsigned	nr_hung;
	int		tick_armed;
	/* coalescing (pipeline.c): the kernel's min-wait, and how busy recent turns were */
	int		ring_fd_registered;
	int		min_wait_ok;
	int		ext_arg_ok;	/* waits with a timeout in one enter (5.11+) */
	unsigned	results_pending; /* results a front end holds for its next flush */
	unsigned	turn_ios;	/* IOs started this turn */
	unsigned	busy_avg;	/* 8 x the recent IOs per turn (a moving average) */
	struct __kernel_timespec tick_ts;
};

struct us_dev {
	struct us_dev_cfg cfg;
	const struct us_target_type *tgt;
	void		*tgt_data;	/* the target's, from its init */
	const struct us_frontend *fe;
	void		*fe_data;	/* the front end's */
	unsigned	op_fetch, op_commit;
	int		stop_efd;
	pthread_mutex_t	lock;
	pthread_cond_t	cond;
	int		nr_ready;	/* queues that finished setup */
	int		nr_failed;
	int		go;		/* 1: fetch and serve, -1: give up */
	int		nr_exited;
	struct us_wlog	*wlog;		/* --powercut: what unflushed writes overwrote */
	int		zc;		/* UBLK_F_AUTO_BUF_REG: READ and WRITE arrive as registered pages */
	int		tgt_zc;		/* the target serves such pages (US_TGT_F_ZERO_COPY) */
	/*
	 * UBLK_F_USER_COPY without zero copy (a zoned device, which the driver
	 * allows no other way): the driver moves no data, every READ's and
	 * WRITE's bytes cross /dev/ublkcN with pread/pwrite (ublk_buffers.c)
	 */
	int		ucopy;
	struct us_queue	q[];
};

/* the two ublk front ends: one command per tag (ring.c), or batches of tags (ring_batch.c) */
extern const struct us_frontend us_ublk_batch_frontend;
/*
 * ublk_buffers.c: where a request's data lives. us_ublk_serve: the driver
 * handed tag over: copy its descriptor and start the IO.
 */
void us_ublk_serve(struct us_queue *q, unsigned tag);
/* zero copy: the buffer table slot a tag's requests are registered at (the tag) */
unsigned us_zc_slot(const struct us_queue *q, unsigned tag);
/* zero copy: the sqe->addr that names it in FETCH and COMMIT_AND_FETCH */
uint64_t us_zc_cmd_addr(const struct us_queue *q, unsigned tag);
/* zero copy: the ring's buffer table, one slot per tag; 0 or -errno (0 without zero copy) */
int us_zc_queue_init(struct us_queue *q);
/* take the copy path for this zero-copy IO (a WRITE's data read in now); 0 or -errno, no-op if not zc */
int us_io_bounce(struct us_queue *q, unsigned tag, struct us_io *io);
/* a bounced READ's data into the request's pages; the result, or -EIO */
int us_io_copy_out(struct us_queue *q, unsigned tag, struct us_io *io, int result);
/* a READ's bytes from..len are zeros (past the end of a file), in buf or in the request's pages */
int us_io_zero_tail(struct us_queue *q, unsigned tag, struct us_io *io, unsigned from, unsigned len);

/* queue the tag's COMMIT_AND_FETCH(result) linked behind the SQE just prepared */
void us_link_commit(struct us_queue *q, unsigned tag, struct io_uring_sqe *head, int result);
void us_shm_attach(struct us_queue *q, void *base);
/* 1 if h->fault_off is where this geometry puts the fault area (faults.c) */
int us_shm_fault_off_ok(const struct us_shm_hdr *h);
void us_rec_begin(struct us_queue *q, unsigned tag, struct us_io *io);
void us_rec_end(struct us_queue *q, unsigned tag, struct us_io *io, int result);
/* names.c: the counter slot of a request's op (US_OP_*) */
int us_op_index(uint32_t op_flags);

/* faults.c: the queue side of the rule engine */
int us_fault_attach(struct us_queue *q, void *shm_base);
void us_fault_detach(struct us_queue *q);
/* a new IO: US_FAULT_PASS (serve it), US_QUEUED (delayed or withheld) or a result to commit */
int us_fault_start(struct us_queue *q, unsigned tag, struct us_io *io);
/* the target answered r: what to commit instead (corrupt reads, torn writes) */
int us_fault_finish(struct us_queue *q, unsigned tag, struct us_io *io, int r);
/* the hung-IO timer fired */
void us_fault_tick(struct us_queue *q);
void us_fault_area_init(struct us_fault_area *a);
/* writelog.c: powercut's memory of unflushed writes (us_wlog_new/free: ushell_api.h) */
void us_wlog_begin(struct us_queue *q, struct us_io *io);
void us_wlog_end(struct us_queue *q, struct us_io *io, int result);
/* logwrites.c: the --log-writes log's hooks, beside the power-cut log's */
void us_lw_begin(struct us_queue *q, struct us_io *io);
void us_lw_end(struct us_queue *q, struct us_io *io, int result);

/* target_mem.c: read len bytes whole, zeros past the end of the file; 0 or -errno */
int us_pread_zero(int fd, char *buf, size_t len, off_t off);
/* read len bytes whole; 0 or -errno (-EIO at the end of the file) */
int us_pread_full(int fd, char *buf, size_t len, off_t off);
/* write len bytes whole; 0 or -errno (-EIO if the file takes nothing) */
int us_pwrite_full(int fd, const char *buf, size_t len, off_t off);

/* an absolute deadline timeout_ms from now on clock, for pthread_cond_timedwait */
static inline void us_deadline(struct timespec *ts, clockid_t clock, int timeout_ms)
{
	clock_gettime(clock, ts);
	ts->tv_sec += timeout_ms / 1000;
	ts->tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
	if (ts->tv_nsec >= 1000000000L) {
		ts->tv_sec++;
		ts->tv_nsec -= 1000000000L;
	}
}

/*
 * pipeline.c: the one path of every IO, whichever front end brought it.
 * us_io_start: the front end filled op_flags, start_sector and nr_sectors
 * (and a write's data in buf); record, faults, target, and in the end the
 * front end's complete().
 */
void us_io_start(struct us_queue *q, unsigned tag);
/* hand an IO to the target (after a delay or a hang ends) */
void us_start_target(struct us_queue *q, unsigned tag);
/* a result for the IO: fault finish, power-cut log, record end, front end */
void us_io_complete(struct us_queue *q, unsigned tag, int result);
/* every CQE of a queue's ring: the pipeline's kinds here, the rest to the front end */
void us_handle_cqe(struct us_queue *q, const struct io_uring_cqe *cqe);
/* submit, wait for one completion, reap them all; nonzero when the ring failed (q->error) */
int us_queue_turn(struct us_queue *q);
/*
 * The queue's ring (sized for depth IOs of the target's SQEs, plus extra
 * entries the front end keeps armed), fixed files, tag buffers and shared
 * memory. 0 or -errno; us_queue_exit undoes whatever was done.
 */
int us_queue_init(struct us_queue *q, unsigned extra);
void us_queue_exit(struct us_queue *q);
/* the device's target from cfg.target, its init; 0 or -errno */
int us_dev_target_init(struct us_dev *d);
/* after the queue threads are gone */
void us_dev_target_deinit(struct us_dev *d);

enum { US_FIXED_CDEV = 0, US_FIXED_BACKING = 1 };

/* point an SQE at the ublk char device or the backing file, as a fixed file when registered */
static inline void us_sqe_set_fd(struct us_queue *q, struct io_uring_sqe *sqe, int which)
{
	if (q->fixed_files) {
		sqe->fd = which;
		sqe->flags |= IOSQE_FIXED_FILE;
	} else {
		sqe->fd = which == US_FIXED_CDEV ? q->dev->cfg.cdev_fd : q->dev->cfg.backing_fd;
	}
}

/* an SQE, zeroed to 128 bytes, flushing the SQ when it is full */
struct io_uring_sqe *us_get_sqe(struct us_queue *q);

/*
 * SQE128 rings: the command area runs past the classic 64-byte SQE, where
 * the compiler's view of struct io_uring_sqe ends; go through a plain pointer.
 */
static inline void *us_sqe_cmd(struct io_uring_sqe *sqe)
{
	return (char *)(uintptr_t)sqe + offsetof(struct io_uring_sqe, cmd);
}

static inline void us_sqe128_zero(struct io_uring_sqe *sqe)
{
	void *p = (void *)(uintptr_t)sqe;

	memset(p, 0, 128);
}

#endif
