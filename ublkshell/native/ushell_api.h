/* SPDX-License-Identifier: MIT */
/*
 * What Python calls through cffi. build.py feeds this file (preprocessor
 * lines dropped) to cffi's cdef, so keep it to plain declarations.
 */
#ifndef USHELL_API_H
#define USHELL_API_H
#include <stdint.h>

/*
 * What Python needs to know about a target (target.h has the hooks): its
 * table entry holds one of these. us_target_info(i) walks the table.
 */
/* where the data lives, which is what Python must open before the device starts */
enum us_backing {
	US_BACKING_NONE = 0,	/* nothing: the target makes its data up (null, pattern) */
	US_BACKING_MEM = 1,	/* a tmpfs file the daemon creates (DATA/NAME.mem), kept for recovery */
	US_BACKING_FILE = 2,	/* the user's file or block device (-f), its size the default */
};
/* which of add's generic options the target takes: the option schema */
enum us_target_opts {
	US_OPT_SIZE = 1,	/* --size is required */
	US_OPT_FILE = 2,	/* -f/--file is required (--size then optional: at most the file) */
	US_OPT_ZONED = 4,	/* --zoned and its geometry (--zone-size, --conv-zones, --max-open, --max-active) */
};
enum us_target_flags {
	US_TGT_F_READ_ONLY = 1,	/* writes fail with EROFS; the device is announced read-only */
	/* serves a READ or WRITE from the request's registered pages when io->zc (fixed buffer slot = tag) */
	US_TGT_F_ZERO_COPY = 2,
};
struct us_target_info {
	const char	*name;
	const char	*help;		/* one line for `add --help` and completion */
	uint32_t	backing;	/* enum us_backing */
	uint32_t	options;	/* enum us_target_opts */
	uint32_t	flags;		/* enum us_target_flags */
	uint32_t	sqes_per_io;	/* most SQEs one IO has in flight at once (0: serves in the thread) */
};
/* the idx-th registered target, NULL past the last */
const struct us_target_info *us_target_info(int idx);


struct us_dev_cfg {
	int		dev_id;
	int		nr_queues;
	int		depth;
	unsigned	max_io_bytes;
	uint64_t	dev_flags;	/* the UBLK_F_* the device was added with */
	int		ioctl_encode;	/* 1: UBLK_U_IO_* opcodes, 0: legacy numbers */
	int		cdev_fd;	/* /dev/ublkcN, opened once and shared */
	int		target;		/* index in the target table (us_target_info) */
	int		backing_fd;	/* loop: file or block device; mem: its shm file */
	uint64_t	dev_bytes;
	uint64_t	backing_bytes;	/* loop: reads at or past this are zeros */
	int		cpus[64];	/* queue -> cpu to pin to, -1 none (queues >= 64 unpinned) */
	void		*shm;		/* the device's shared memory (records.h), NULL for none */
	int		backing_in_memory; /* loop: the file lives in RAM (tmpfs): copy in the queue thread */
	int		no_records;	/* 1: keep no counters or records (benchmarks); faults still apply */
	uint64_t	write_log_bytes; /* powercut: log unflushed writes up to this much, 0 off */
	int		write_log_fd;	/* powercut: reads old data and puts it back (buffered) */
	/* a busy queue waits this long for more completions before serving (us), 0 never */
	unsigned	coalesce_us;
	/* zero copy: name slots the ring lacks, so every request takes the driver's fallback (NEED_REG_BUF) */
	int		zc_fallback;
	/* zoned (UBLK_F_ZONED): zone size in sectors, 0 for a device without zones; the rest only then */
	uint64_t	zone_sectors;
	uint32_t	zone_conv;	/* conventional zones, at the start */
	uint32_t	zone_max_open;	/* 0: no limit */
	uint32_t	zone_max_active; /* 0: no limit */
	int		zone_fd;	/* the zone state file (zones.c), beside the data */
	struct us_lwlog	*logw;		/* --log-writes (us_lw_open), NULL none; the caller closes it */
};

/*
 * Zones (zones.c): the state machine of a zoned mem device, callable on its
 * own (tests). The state file must be us_zones_file_size(nr_zones) bytes:
 * zeros are formatted, a file written before is adopted if its geometry is
 * this one (-EINVAL otherwise). NULL with *err = -errno.
 */
enum { US_ZONES_MAX = 1048576 };	/* zones a device may have: the state file stays 16 MiB or less */
struct us_zones;
uint64_t us_zones_file_size(uint32_t nr_zones);
struct us_zones *us_zones_open(int state_fd, int data_fd, uint64_t dev_sectors, uint64_t zone_sectors,
			       uint32_t nr_conv, uint32_t max_open, uint32_t max_active, int *err);
void us_zones_close(struct us_zones *zs);
/*
 * Serve one request on a zoned device (UBLK_IO_OP_* in op_flags; for
 * REPORT_ZONES nr is the number of zones): data in or out of buf (buf_len
 * bytes of room). The result as a target gives it; *lba: where an append
 * (or write) landed.
 */
int us_zones_io(struct us_zones *zs, uint32_t op_flags, uint64_t sector, uint32_t nr, char *buf,
		size_t buf_len, uint64_t *lba);

struct us_dev;

/* one control command on /dev/ublk-control: returns cqe->res (>= 0 or -errno) */
int us_ctrl_cmd(int ctrl_fd, unsigned cmd_op, struct ublksrv_ctrl_cmd *cmd);

/*
 * Set up every queue (thread, ring, descriptor mmap, buffers) and let the
 * threads FETCH every tag. Returns NULL with *err = -errno on failure.
 * START_DEV (or END_USER_RECOVERY) must follow from another thread.
 */
struct us_dev *us_dev_start(const struct us_dev_cfg *cfg, int *err);
/* 1 once every queue thread has exited, 0 after timeout_ms */
int us_dev_wait(struct us_dev *d, int timeout_ms);
/* make the queue threads leave at once, abandoning their commands to the kernel */
void us_dev_abort(struct us_dev *d);
/* first fatal error a queue hit (-errno), 0 if none */
int us_dev_queue_error(struct us_dev *d, int q_id);
void us_dev_free(struct us_dev *d);
/*
 * After the queues have exited: put back what every write not yet made durable
 * by a FLUSH (or FUA) overwrote, except a random keep_ppm per million of them.
 * The outcome goes to report (pc_*). Returns the writes undone, or -errno
 * (-EOPNOTSUPP: the device keeps no write log).
 */
int us_dev_powercut(struct us_dev *d, uint32_t keep_ppm, uint64_t seed, struct us_fault_area *report);

/*
 * The write log behind us_dev_powercut, on its own: what writes overwrote
 * in fd (read through fd, put back through fd), up to limit bytes of it.
 */
struct us_wlog;
struct us_wlog *us_wlog_new(int fd, uint64_t limit);
void us_wlog_free(struct us_wlog *w);
/*
 * Undo what is not durable (as us_dev_powercut). report: pc_dropped (undone),
 * pc_kept, pc_failed (an undo's write or the final fsync failed: old, new or
 * mixed data), pc_errno (the first such error), pc_dropped_bytes, pc_done.
 * Returns pc_dropped or -errno.
 */
int us_wlog_powercut(struct us_wlog *w, uint32_t keep_ppm, uint64_t seed, struct us_fault_area *report);
/*
 * Tests: an IO as the ring loop hands it to the log, without a device. begin
 * before the target runs it (a write's old data is read from fd now), end
 * when its result goes back (completed 0: it was still in flight at the cut;
 * the handle is only freed). NULL: out of memory.
 */
void *us_wlog_test_begin(struct us_wlog *w, uint32_t op_flags, uint64_t sector, uint32_t nr_sectors);
void us_wlog_test_end(struct us_wlog *w, void *io, int completed);

/*
 * add --log-writes (logwrites.c): a dm-log-writes log of what the device
 * completes, appended to fd by a writer thread. sectorsize: the device's
 * logical block size (the log's unit). entries, next_off: where an adopted log
 * goes on (0, 0 for a new one). limit: bytes of write data the log may hold in
 * memory (waiting for a flush, or for the writer); past it logging stops.
 * The device takes it through cfg.logw; close it after the queues are gone.
 */
struct us_lwlog;
struct us_lw_status {
	uint64_t	entries;	/* counted by the log's super block (what a reader sees) */
	uint64_t	log_bytes;	/* the log file's length */
	uint64_t	held_bytes;	/* write data in memory now */
	uint64_t	held_max;	/* the most there ever was */
	uint32_t	marks;
	int32_t		error;		/* positive errno once logging stopped (ENOBUFS: over limit) */
};
struct us_lwlog *us_lw_open(int fd, uint32_t sectorsize, uint64_t entries, uint64_t next_off,
			    uint64_t limit, int *err);
/*
 * Append a mark after everything logged so far: 0 and its *ticket, or -errno
 * (-EINVAL: empty, or longer than a sector holds beside the entry header).
 * us_lw_mark_state: 1 once it is in the file (*index: its entry number, or
 * UINT64_MAX if a later mark was written first), 0 while it waits, -errno if
 * logging stopped first. us_lw_mark: both, waiting up to timeout_ms.
 */
int us_lw_mark_add(struct us_lwlog *lw, const char *name, uint64_t *ticket);
int us_lw_mark_state(struct us_lwlog *lw, uint64_t ticket, uint64_t *index);
int us_lw_mark(struct us_lwlog *lw, const char *name, int timeout_ms, uint64_t *index);
/* wait until what is ready is in the file: 0 or -errno (-ETIMEDOUT) */
int us_lw_sync(struct us_lwlog *lw, int timeout_ms);
void us_lw_status(struct us_lwlog *lw, struct us_lw_status *st);
/*
 * Stop the writer and free. end_mark non-NULL: writes still held are logged
 * first (they happened to the device), then a mark of that name if it is not
 * empty; NULL drops them. What the writer cannot write within timeout_ms is
 * dropped (-ETIMEDOUT). 0, or -errno: logging had stopped, or the last write
 * or the fsync failed.
 */
int us_lw_close(struct us_lwlog *lw, const char *end_mark, int timeout_ms);
/* Tests: an IO as the pipeline hands it to the log (data: a WRITE's, nr_sectors x 512 bytes) */
void *us_lw_test_begin(struct us_lwlog *lw, uint32_t op_flags, uint64_t sector, uint32_t nr_sectors,
		       const char *data);
void us_lw_test_end(struct us_lwlog *lw, void *io, int result);

/*
 * The device's shared memory (records.h): layout, initialisation, readers.
 * The file is input from whoever could write it, so no reader below may be
 * given a mapping that us_shm_check has not accepted for the mapped length:
 * they take the header's offsets as they are.
 */
/* 0 for a geometry outside the limits us_shm_check enforces */
uint64_t us_shm_size(uint32_t nr_queues, uint32_t depth, uint32_t rec_entries);
int us_shm_init(void *base, uint64_t len, uint32_t nr_queues, uint32_t depth,
		uint32_t rec_entries, uint32_t dev_id, int32_t pid);
/* why us_shm_check refused a file, in words for the user */
struct us_shm_bad {
	char		why[96];	/* "queue_off 1099511627776, expected 192" */
};
/*
 * 0 if base[0..len) is a statistics file the readers can use: magic, version,
 * header and histogram sizes, geometry within ublk's limits, and every offset
 * exactly what us_shm_init lays out for that geometry, within len. Otherwise
 * -EBADMSG and, if bad is not NULL, the first field that is wrong.
 */
int us_shm_check(const void *base, uint64_t len, struct us_shm_bad *bad);
struct us_shm_queue *us_shm_queue(void *base, int q_id);
struct us_tag_state *us_shm_tags(void *base, int q_id);
uint64_t us_rec_head(void *base, int q_id);
/* 1: *out is record seq; 0: not written yet; -1: overwritten (the reader fell behind) */
int us_rec_read(void *base, int q_id, uint64_t seq, struct us_rec *out);
/*
 * Up to max records of queue q_id, from *cursor on, copied in order into out:
 * how many (0: nothing new), or -EINVAL (no such queue, or base[0..len) no
 * longer holds the geometry its header names). A cursor more than a ring
 * behind jumps to the oldest record still there, and a record overwritten
 * while it was copied is skipped: both add to *lost. *cursor ends past the
 * last record looked at. len is the checked mapping's length.
 */
int us_rec_read_batch(const void *base, uint64_t len, int q_id, uint64_t *cursor,
		      struct us_rec *out, int max, uint64_t *lost);
int us_hist_bucket(uint64_t v);
uint64_t us_hist_low(int idx);
uint64_t us_now_ns(void);
/*
 * The names of what the headers number (records.c spells them once): stats op
 * slot idx (0..US_NR_OPS-1) and the UBLK_IO_OP_* it counts (-1: every other
 * op); IO flag i and its UBLK_IO_F_* bit; fault action US_FA_*. NULL (or -1,
 * 0) past the end.
 */
const char *us_op_name(int idx);
int us_op_code(int idx);
const char *us_io_flag_name(int i);
/* the name of any UBLK_IO_OP_* an IO can carry (the slots' ops and the zone ops), NULL if none */
const char *us_op_code_name(int code);
uint32_t us_io_flag_bit(int i);
const char *us_fault_action_name(uint32_t action);
/* one IO through the recording code, without a device (tests) */
int us_shm_record_io(void *base, int q_id, unsigned tag, uint32_t op_flags, uint64_t sector,
		     uint32_t nr_sectors, int32_t result, uint64_t lat_ns);

/*
 * Fault rules (faults.h) in a device's shared memory. Callers serialise
 * writers (flock on the file); the queues see each change whole.
 */
struct us_fault_area *us_fault_area_of(void *shm_base);
/*
 * Install n rules at once, in order, under one publication: the queues see
 * none of them or all. Every rule is checked first (-EINVAL), then the free
 * slots (-ENOSPC) and ids (-ERANGE: ids are never reused and a record holds
 * 24 bits of one); nothing is installed on error. n, with their ids in
 * ids_out (may be NULL).
 */
int us_fault_add_set(void *shm_base, const struct us_fault_rule *rules, int n, uint32_t *ids_out);
/* one rule: its new id, or the errors of us_fault_add_set */
int us_fault_add(void *shm_base, const struct us_fault_rule *r);
/*
 * 0, or -ENOENT; id 0 removes every rule. Once no badblocks rule is left the
 * heal log is emptied (after the queue threads have left it, waiting up to 1 s).
 */
int us_fault_del(void *shm_base, uint32_t id);
void us_fault_set_seed(void *shm_base, uint64_t seed);
/*
 * A consistent copy of the first max rules in match order with their
 * counters (badblocks: healed = distinct sectors rewritten): how many there are.
 */
int us_fault_list(void *shm_base, struct us_fault_rule *rules, struct us_fault_ctr *ctrs, int max);
/*
 * Match one IO as queue q_id would, without a device (tests of the matcher):
 * the action | id << 8 that applies, 0 for none. Counters move as for real.
 */
uint32_t us_fault_eval(void *shm_base, int q_id, unsigned tag, uint32_t op_flags,
		       uint64_t sector, uint32_t nr_sectors);

/* 1 if fd's data lives in memory (tmpfs, ramfs): IO on it never waits for a device */
int us_fd_in_memory(int fd);

/* smallest O_DIRECT alignment (512 or 4096) that reads from fd work with, 0 if none */
int us_probe_direct(int fd);
#endif
