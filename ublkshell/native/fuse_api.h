/* SPDX-License-Identifier: MIT */
/*
 * The FUSE transport, for kernels without ublk_drv: a built-in target served
 * as one file ("disk") in a FUSE mount, which `losetup` can turn into a block
 * device. build.py feeds this file (preprocessor lines dropped) to cffi's
 * cdef, so keep it to plain declarations.
 */
#ifndef USHELL_FUSE_API_H
#define USHELL_FUSE_API_H
#include <stdint.h>

struct us_fuse_cfg {
	int		target;		/* index in the target table (us_target_info) */
	int		backing_fd;	/* mem: its tmpfs file; loop: the backing file; null: -1 */
	uint64_t	dev_bytes;	/* the disk file's size */
	unsigned	block_size;
	unsigned	max_io_bytes;	/* largest single read or write */
	unsigned	depth;		/* tags: requests recorded as being served at once */
	unsigned	max_threads;	/* FUSE worker threads, at most depth */
	void		*shm;		/* the device's shared memory (records.h), queue 0 */
	uint64_t	backing_bytes;	/* loop: reads at or past this are zeros */
	int		backing_in_memory; /* loop: the file lives in RAM: copy in the queue thread */
	uint64_t	write_log_bytes; /* powercut: log unflushed writes up to this much, 0 off */
	int		write_log_fd;	/* powercut: reads old data and puts it back (buffered) */
	struct us_lwlog	*logw;		/* --log-writes (us_lw_open), NULL none; the caller closes it */
	int		no_records;	/* 1: keep no counters or records; faults still apply */
};

struct us_fuse;

/*
 * Mount the FUSE file system on mountpoint and serve it from worker threads.
 * Returns NULL with a one-line reason in err on failure (nothing left mounted).
 */
struct us_fuse *us_fuse_start(const struct us_fuse_cfg *cfg, const char *mountpoint,
			      const char *fsname, char *err, int errlen);
/*
 * End the IO: every request the queue holds (hung, delayed, being served)
 * gets EIO, as do those that come later. Before a delete detaches the loop
 * device (whose teardown waits for its IO). 0 or -errno.
 */
int us_fuse_stop_io(struct us_fuse *f);
/*
 * Power cut: stop the IO, then undo the unflushed writes (us_wlog_powercut,
 * ushell_api.h). -EOPNOTSUPP without a write log.
 */
int us_fuse_powercut(struct us_fuse *f, uint32_t keep_ppm, uint64_t seed, struct us_fault_area *report);
/* 1 once the session loop has ended (unmounted, aborted), 0 after timeout_ms */
int us_fuse_wait(struct us_fuse *f, int timeout_ms);
/* 0: unmounted; 1: busy, detached lazily (it goes when its last user closes); -errno */
int us_fuse_unmount(struct us_fuse *f);
/* after the loop ended: close the session; returns 0, or -EBUSY if the loop still runs */
int us_fuse_free(struct us_fuse *f);
/*
 * Detach whatever is mounted on path, lazily: the kernel finds the mount
 * without asking it anything, so a FUSE mount whose daemon died cannot hang
 * or fail this. 0 or -errno.
 */
int us_umount_lazy(const char *path);
#endif
