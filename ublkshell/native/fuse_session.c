/* SPDX-License-Identifier: MIT */
/*
 * The FUSE transport's file system: one file, "disk", at the root of a FUSE
 * mount, of the device's size. Names, attributes, opens and statfs are
 * answered here by the session's worker threads; its IO goes to the front
 * end (fuse_transport.c) and through the pipeline.
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 312
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "fuse_transport.h"

/* -- attributes and names ---------------------------------------------------------- */
static void fill_attr(struct us_fuse *f, fuse_ino_t ino, struct stat *st)
{
	struct stat bst;

	memset(st, 0, sizeof(*st));
	st->st_ino = ino;
	st->st_atim = st->st_mtim = st->st_ctim = f->t0;
	if (ino == FUSE_ROOT_ID) {
		st->st_mode = S_IFDIR | 0700;
		st->st_nlink = 2;
		return;
	}
	st->st_mode = S_IFREG | 0600;
	st->st_nlink = 1;
	st->st_size = f->cfg.dev_bytes;
	st->st_blksize = f->cfg.block_size > 4096 ? f->cfg.block_size : 4096;
	/* what the data really takes (a sparse mem device: what was written) */
	if (f->cfg.backing_fd >= 0 && fstat(f->cfg.backing_fd, &bst) == 0)
		st->st_blocks = bst.st_blocks;
}

static void fx_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct us_fuse *f = fuse_req_userdata(req);
	struct fuse_entry_param e;

	if (parent != FUSE_ROOT_ID || strcmp(name, DISK_NAME)) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	memset(&e, 0, sizeof(e));
	e.ino = DISK_INO;
	e.generation = 1;
	e.attr_timeout = e.entry_timeout = ATTR_TIMEOUT;
	fill_attr(f, DISK_INO, &e.attr);
	fuse_reply_entry(req, &e);
}

static void fx_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct us_fuse *f = fuse_req_userdata(req);
	struct stat st;

	(void)fi;
	if (ino != FUSE_ROOT_ID && ino != DISK_INO) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	fill_attr(f, ino, &st);
	fuse_reply_attr(req, &st, ATTR_TIMEOUT);
}

/*
 * The disk's size, mode and owner are fixed. A truncation is ignored, as
 * opening a block device with O_TRUNC is: `dd of=disk` must not shrink it.
 */
static void fx_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
		       struct fuse_file_info *fi)
{
	(void)attr; (void)to_set;
	fx_getattr(req, ino, fi);
}

static void fx_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		       struct fuse_file_info *fi)
{
	static const struct { const char *name; fuse_ino_t ino; mode_t mode; } ents[] = {
		{ ".", FUSE_ROOT_ID, S_IFDIR }, { "..", FUSE_ROOT_ID, S_IFDIR },
		{ DISK_NAME, DISK_INO, S_IFREG },
	};
	char buf[256];
	size_t used = 0, n;
	struct stat st;
	off_t i;

	(void)fi;
	if (ino != FUSE_ROOT_ID) {
		fuse_reply_err(req, ENOTDIR);
		return;
	}
	for (i = off; i < (off_t)(sizeof(ents) / sizeof(ents[0])); i++) {
		memset(&st, 0, sizeof(st));
		st.st_ino = ents[i].ino;
		st.st_mode = ents[i].mode;
		n = fuse_add_direntry(req, buf + used, sizeof(buf) - used, ents[i].name, &st, i + 1);
		if (n > sizeof(buf) - used || used + n > size)
			break;
		used += n;
	}
	fuse_reply_buf(req, buf, used);
}

static void fx_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct us_fuse *f = fuse_req_userdata(req);

	if (ino == FUSE_ROOT_ID) {
		fuse_reply_err(req, EISDIR);
		return;
	}
	if (ino != DISK_INO) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	/* a read-only target: losetup then falls back to a read-only loop device */
	if ((us_target_info(f->cfg.target)->flags & US_TGT_F_READ_ONLY) &&
	    (fi->flags & O_ACCMODE) != O_RDONLY) {
		fuse_reply_err(req, EROFS);
		return;
	}
	/* every IO comes to us (and is recorded), none is answered from the page cache */
	fi->direct_io = 1;
	fi->keep_cache = 0;
	fuse_reply_open(req, fi);
}

/* close(): nothing of ours to write back (fsync is the flush) */
static void fx_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino; (void)fi;
	fuse_reply_err(req, 0);
}

static void fx_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino; (void)fi;
	fuse_reply_err(req, 0);
}

static void fx_statfs(fuse_req_t req, fuse_ino_t ino)
{
	struct us_fuse *f = fuse_req_userdata(req);
	struct statvfs sv;
	unsigned bs = f->cfg.block_size > 4096 ? f->cfg.block_size : 4096;

	(void)ino;
	memset(&sv, 0, sizeof(sv));
	/* the loop driver takes its discard granularity from f_bsize */
	sv.f_bsize = sv.f_frsize = bs;
	sv.f_blocks = f->cfg.dev_bytes / bs;
	sv.f_files = 2;
	sv.f_namemax = 255;
	fuse_reply_statfs(req, &sv);
}

static void fx_init(void *userdata, struct fuse_conn_info *conn)
{
	struct us_fuse *f = userdata;

	/* loop's IO arrives as async direct IO: let several be in flight at once */
	if (conn->capable & FUSE_CAP_ASYNC_DIO)
		conn->want |= FUSE_CAP_ASYNC_DIO;
	conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
	/* an O_TRUNC open must not reach setattr as a truncation */
	if (conn->capable & FUSE_CAP_ATOMIC_O_TRUNC)
		conn->want |= FUSE_CAP_ATOMIC_O_TRUNC;
	if (f->cfg.max_io_bytes && conn->max_write > f->cfg.max_io_bytes)
		conn->max_write = f->cfg.max_io_bytes;
	conn->max_read = f->cfg.max_io_bytes;
	if (conn->max_background < f->cfg.max_threads)
		conn->max_background = f->cfg.max_threads;
}

static const struct fuse_lowlevel_ops fx_ops = {
	.init		= fx_init,
	.lookup		= fx_lookup,
	.getattr	= fx_getattr,
	.setattr	= fx_setattr,
	.readdir	= fx_readdir,
	.open		= fx_open,
	.read		= fx_read,
	.write		= fx_write,
	.flush		= fx_flush,
	.release	= fx_release,
	.fsync		= fx_fsync,
	.statfs		= fx_statfs,
	.fallocate	= fx_fallocate,
};

/* -- the session ------------------------------------------------------------------------ */
static void *fx_loop(void *arg)
{
	struct us_fuse *f = arg;
	struct fuse_loop_config *lc;
	sigset_t all;

	/* signals are the Python daemon's business (its main thread); workers inherit this */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	lc = fuse_loop_cfg_create();
	if (lc) {
		fuse_loop_cfg_set_clone_fd(lc, 0);
		fuse_loop_cfg_set_max_threads(lc, f->cfg.max_threads);
		fuse_session_loop_mt(f->se, lc);
		fuse_loop_cfg_destroy(lc);
	}
	pthread_mutex_lock(&f->done_lock);
	f->done = 1;
	pthread_cond_broadcast(&f->done_cond);
	pthread_mutex_unlock(&f->done_lock);
	return NULL;
}

static void fx_release_all(struct us_fuse *f)
{
	us_fuse_stop_io(f);
	if (f->se)
		fuse_session_destroy(f->se);
	fx_dev_free(f->d);
	if (f->bell_efd >= 0)
		close(f->bell_efd);
	pthread_mutex_destroy(&f->lock);
	pthread_cond_destroy(&f->cond);
	pthread_mutex_destroy(&f->done_lock);
	pthread_cond_destroy(&f->done_cond);
	free(f->free_tags);
	free(f->handed);
	free(f->batch);
	free(f->reqs);
	free(f->mountpoint);
	free(f);
}

/* the queue thread, once it has its ring: 0 or -errno */
struct us_fuse *us_fuse_start(const struct us_fuse_cfg *cfg, const char *mountpoint,
			      const char *fsname, char *err, int errlen)
{
	struct us_fuse *f;
	struct fuse_args args = FUSE_ARGS_INIT(0, NULL);
	pthread_condattr_t ca;
	char opts[512];
	unsigned i;
	int rc;

	if (!cfg->depth || cfg->depth > UBLK_MAX_QUEUE_DEPTH || !cfg->max_threads ||
	    cfg->max_threads > cfg->depth || !cfg->dev_bytes || cfg->max_io_bytes < 4096 ||
	    cfg->max_io_bytes % 512 || !us_target_info(cfg->target)) {
		snprintf(err, errlen, "bad FUSE transport configuration");
		return NULL;
	}
	f = calloc(1, sizeof(*f));
	if (!f) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	f->cfg = *cfg;
	f->bell_efd = -1;
	clock_gettime(CLOCK_REALTIME, &f->t0);
	pthread_mutex_init(&f->lock, NULL);
	pthread_cond_init(&f->cond, NULL);
	pthread_mutex_init(&f->done_lock, NULL);
	/* us_fuse_wait's deadline is on CLOCK_MONOTONIC: a cond on another clock would misread it */
	rc = pthread_condattr_init(&ca);
	if (!rc) {
		rc = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
		if (!rc)
			rc = pthread_cond_init(&f->done_cond, &ca);
		pthread_condattr_destroy(&ca);
	}
	if (rc) {
		snprintf(err, errlen, "cannot set up the FUSE transport's wait: %s", strerror(rc));
		pthread_mutex_destroy(&f->lock);
		pthread_cond_destroy(&f->cond);
		pthread_mutex_destroy(&f->done_lock);
		free(f);
		return NULL;
	}
	f->mountpoint = strdup(mountpoint);
	f->free_tags = calloc(cfg->depth, sizeof(*f->free_tags));
	f->handed = calloc(cfg->depth, sizeof(*f->handed));
	f->batch = calloc(cfg->depth, sizeof(*f->batch));
	f->reqs = calloc(cfg->depth, sizeof(*f->reqs));
	f->bell_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (!f->mountpoint || !f->free_tags || !f->handed || !f->batch || !f->reqs || f->bell_efd < 0) {
		snprintf(err, errlen, "out of memory");
		fx_release_all(f);
		return NULL;
	}
	/* tag 0 on top: handed out lowest first, as the ublk driver tends to */
	for (i = 0; i < cfg->depth; i++)
		f->free_tags[f->nr_free++] = cfg->depth - 1 - i;
	f->d = fx_dev_new(f, &rc);
	if (!f->d) {
		snprintf(err, errlen, "cannot set up the %s target: %s", us_target_info(cfg->target)->name,
			 strerror(-rc));
		fx_release_all(f);
		return NULL;
	}
	rc = fx_start_queue(f);
	if (rc) {
		snprintf(err, errlen, "cannot start the FUSE queue thread: %s", strerror(-rc));
		fx_release_all(f);
		return NULL;
	}

	/* fuse_args wants its own strings: the session keeps pointers into them */
	snprintf(opts, sizeof(opts), "fsname=%s,subtype=ublkshell,max_read=%u", fsname,
		 cfg->max_io_bytes);
	if (fuse_opt_add_arg(&args, "ublkshell") || fuse_opt_add_arg(&args, "-o") ||
	    fuse_opt_add_arg(&args, opts)) {
		snprintf(err, errlen, "out of memory");
		fuse_opt_free_args(&args);
		fx_release_all(f);
		return NULL;
	}
	f->se = fuse_session_new(&args, &fx_ops, sizeof(fx_ops), f);
	fuse_opt_free_args(&args);
	if (!f->se) {
		snprintf(err, errlen, "cannot create a FUSE session (see the daemon log)");
		fx_release_all(f);
		return NULL;
	}
	if (fuse_session_mount(f->se, mountpoint)) {
		snprintf(err, errlen, "cannot mount FUSE on %s (see the daemon log)", mountpoint);
		fx_release_all(f);
		return NULL;
	}
	rc = pthread_create(&f->thr, NULL, fx_loop, f);
	if (rc) {
		snprintf(err, errlen, "cannot start the FUSE thread: %s", strerror(rc));
		fuse_session_unmount(f->se);
		fx_release_all(f);
		return NULL;
	}
	f->thr_started = 1;
	return f;
}

int us_fuse_wait(struct us_fuse *f, int timeout_ms)
{
	struct timespec ts;
	int done;

	us_deadline(&ts, CLOCK_MONOTONIC, timeout_ms);
	pthread_mutex_lock(&f->done_lock);
	while (!f->done) {
		if (pthread_cond_timedwait(&f->done_cond, &f->done_lock, &ts) == ETIMEDOUT)
			break;
	}
	done = f->done;
	pthread_mutex_unlock(&f->done_lock);
	return done;
}

int us_fuse_unmount(struct us_fuse *f)
{
	/*
	 * A plain unmount while the workers still serve: the kernel ends the
	 * connection, their reads see ENODEV and the session loop returns. If
	 * something still has the disk open, detach it from the tree instead; the
	 * daemon's exit then aborts the connection, so its users get errors, never
	 * a hang.
	 */
	if (umount2(f->mountpoint, UMOUNT_NOFOLLOW) == 0)
		return 0;
	if (errno == EBUSY && umount2(f->mountpoint, MNT_DETACH | UMOUNT_NOFOLLOW) == 0)
		return 1;
	return -errno;
}

int us_fuse_free(struct us_fuse *f)
{
	if (!f)
		return 0;
	if (f->thr_started) {
		if (!us_fuse_wait(f, 0))
			return -EBUSY;
		pthread_join(f->thr, NULL);
		f->thr_started = 0;
	}
	/* closes /dev/fuse; the mount is gone already (or this detaches what is left) */
	fuse_session_unmount(f->se);
	fx_release_all(f);
	return 0;
}

int us_umount_lazy(const char *path)
{
	return umount2(path, MNT_DETACH | UMOUNT_NOFOLLOW) < 0 ? -errno : 0;
}
