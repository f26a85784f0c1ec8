/* SPDX-License-Identifier: MIT */
/*
 * The FUSE transport: the built-in targets on kernels without ublk_drv.
 *
 * The device is one regular file, "disk", at the root of a FUSE mount. Every
 * open gets FOPEN_DIRECT_IO, so each read and write of it (by the loop driver
 * when `losetup` attached it, or by anyone) reaches these handlers instead of
 * the page cache, and is served the way the ublk path's targets serve it:
 *   mem:  pread/pwrite on its tmpfs file, discard/write-zeroes punch a hole,
 *         flush has nothing to do (RAM);
 *   loop: pread/pwrite on the backing fd (reads past its end are zeros),
 *         flush = fdatasync, discard = punch, write-zeroes = zero range;
 *   null: reads are zeros, writes are dropped.
 * fsync is FLUSH, fallocate(PUNCH_HOLE) is DISCARD, fallocate(ZERO_RANGE) is
 * WRITE_ZEROES: what the loop driver turns those block requests into.
 *
 * Each IO is recorded in the device's shared memory through the same
 * us_rec_begin/us_rec_end the ublk queue threads use, as queue 0 with a tag
 * from a pool of `depth`. Those functions assume one writer per queue; the
 * FUSE worker threads are several, so one mutex serializes the (short)
 * recording steps while the IO itself runs unlocked.
 *
 * Offsets and lengths are bytes here (the file may be read at any offset);
 * records carry the sectors the IO touched.
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
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <fuse_lowlevel.h>

#include "ushell.h"
#include "fuse_api.h"

#define DISK_INO	2
#define DISK_NAME	"disk"
#define ZERO_CHUNK	(256u << 10)
#define ATTR_TIMEOUT	1.0

#ifndef FALLOC_FL_WRITE_ZEROES
#define FALLOC_FL_WRITE_ZEROES	0x80	/* 6.17+: zeroes written, never a hole */
#endif

struct us_fuse {
	struct us_fuse_cfg cfg;
	char		*mountpoint;
	struct fuse_session *se;
	pthread_t	thr;
	int		thr_started;
	struct timespec	t0;		/* the file's times: when the device came up */

	/* recording: the us_queue view of shm queue 0, its tags, one writer at a time */
	pthread_mutex_t	rec_lock;
	pthread_cond_t	tag_freed;
	struct us_queue	q;
	struct us_io	*ios;
	uint8_t		*tag_busy;

	/* the session loop's end */
	pthread_mutex_t	done_lock;
	pthread_cond_t	done_cond;
	int		done;

	char		*zeros;		/* ZERO_CHUNK of zeros for null reads, shared read-only */
};

/* -- a thread's IO buffer (FUSE workers come and go: freed with the thread) ----- */
static pthread_key_t buf_key;
static pthread_once_t buf_once = PTHREAD_ONCE_INIT;

struct tbuf { char *p; size_t len; };

static void tbuf_free(void *v)
{
	struct tbuf *b = v;

	free(b->p);
	free(b);
}

static void tbuf_init(void)
{
	pthread_key_create(&buf_key, tbuf_free);
}

static char *thread_buf(size_t len)
{
	struct tbuf *b = pthread_getspecific(buf_key);
	void *p;

	if (!b) {
		b = calloc(1, sizeof(*b));
		if (!b)
			return NULL;
		pthread_setspecific(buf_key, b);
	}
	if (b->len < len) {
		if (posix_memalign(&p, 4096, len))
			return NULL;
		free(b->p);
		b->p = p;
		b->len = len;
	}
	return b->p;
}

/* -- recording --------------------------------------------------------------- */
static unsigned rec_begin(struct us_fuse *f, uint32_t op_flags, uint64_t off, uint64_t len)
{
	unsigned tag;
	struct us_io *io;
	uint64_t first = off >> 9, end = (off + len + 511) >> 9;

	pthread_mutex_lock(&f->rec_lock);
	for (;;) {
		for (tag = 0; tag < f->cfg.depth && f->tag_busy[tag]; tag++)
			;
		if (tag < f->cfg.depth)
			break;
		/* more requests than tags: the extra ones wait, as they would for a ublk tag */
		pthread_cond_wait(&f->tag_freed, &f->rec_lock);
	}
	f->tag_busy[tag] = 1;
	io = &f->ios[tag];
	memset(io, 0, sizeof(*io));
	io->op_flags = op_flags;
	io->start_sector = first;
	io->nr_sectors = (uint32_t)(end - first);
	us_rec_begin(&f->q, tag, io);
	pthread_mutex_unlock(&f->rec_lock);
	return tag;
}

static void rec_end(struct us_fuse *f, unsigned tag, int result)
{
	pthread_mutex_lock(&f->rec_lock);
	us_rec_end(&f->q, tag, &f->ios[tag], result);
	f->tag_busy[tag] = 0;
	pthread_cond_signal(&f->tag_freed);
	pthread_mutex_unlock(&f->rec_lock);
}

/* -- the targets, byte-addressed ------------------------------------------------- */
static int tgt_is(const struct us_fuse *f, const char *name)
{
	const struct us_target_info *t = us_target_info(f->cfg.target);

	return t && !strcmp(t->name, name);
}

/* how much of [off, off + size) lies on the device: a block device ends where it ends */
static size_t on_device(const struct us_fuse *f, off_t off, size_t size)
{
	if ((uint64_t)off >= f->cfg.dev_bytes)
		return 0;
	return size < f->cfg.dev_bytes - off ? size : f->cfg.dev_bytes - off;
}

static int falloc(int fd, int mode, off_t off, off_t len)
{
	return fallocate(fd, mode | FALLOC_FL_KEEP_SIZE, off, len) < 0 ? -errno : 0;
}

static int do_flush(struct us_fuse *f)
{
	/* mem lives in RAM and null has nothing: only a loop file has data to push */
	if (!tgt_is(f, "loop"))
		return 0;
	return fdatasync(f->cfg.backing_fd) < 0 ? -errno : 0;
}

static int do_discard(struct us_fuse *f, off_t off, off_t len)
{
	int res;

	if (tgt_is(f, "null"))
		return 0;
	res = falloc(f->cfg.backing_fd, FALLOC_FL_PUNCH_HOLE, off, len);
	/*
	 * The loop driver also sends write-zeroes as a punch, so a backing store
	 * that cannot punch must still zero the range rather than keep the data.
	 */
	if (res == -EOPNOTSUPP)
		res = falloc(f->cfg.backing_fd, FALLOC_FL_ZERO_RANGE, off, len);
	return res;
}

static int do_write_zeroes(struct us_fuse *f, off_t off, off_t len)
{
	int res;

	if (tgt_is(f, "null"))
		return 0;
	/* tmpfs has no zero range: a hole reads back as zeros there (the mem target's way) */
	if (tgt_is(f, "mem"))
		return falloc(f->cfg.backing_fd, FALLOC_FL_PUNCH_HOLE, off, len);
	res = falloc(f->cfg.backing_fd, FALLOC_FL_ZERO_RANGE, off, len);
	if (res == -EOPNOTSUPP)
		res = falloc(f->cfg.backing_fd, FALLOC_FL_PUNCH_HOLE, off, len);
	return res;
}

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
	if (ino == FUSE_ROOT_ID) {
		fuse_reply_err(req, EISDIR);
		return;
	}
	if (ino != DISK_INO) {
		fuse_reply_err(req, ENOENT);
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

/* -- IO ------------------------------------------------------------------------------ */
static void reply_zeros(fuse_req_t req, struct us_fuse *f, size_t len)
{
	struct iovec iov[64];
	int n = 0;
	char *buf;

	if (len <= (size_t)ZERO_CHUNK * 64) {
		while (len) {
			size_t c = len < ZERO_CHUNK ? len : ZERO_CHUNK;

			iov[n].iov_base = f->zeros;
			iov[n++].iov_len = c;
			len -= c;
		}
		fuse_reply_iov(req, iov, n);
		return;
	}
	buf = thread_buf(len);
	if (!buf) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	memset(buf, 0, len);
	fuse_reply_buf(req, buf, len);
}

static void fx_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	struct us_fuse *f = fuse_req_userdata(req);
	size_t len;
	unsigned tag;
	char *buf = NULL;
	int res;

	(void)ino; (void)fi;
	if (off < 0) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	/* reads at the end are short, then empty */
	len = on_device(f, off, size);
	tag = rec_begin(f, UBLK_IO_OP_READ, off, len);
	if (tgt_is(f, "null")) {
		rec_end(f, tag, (int)len);
		reply_zeros(req, f, len);
		return;
	}
	buf = thread_buf(len ? len : 1);
	res = buf ? us_pread_zero(f->cfg.backing_fd, buf, len, off) : -ENOMEM;
	if (res == 0)
		res = (int)len;
	/* ended before the reply, as the ublk path ends before its commit */
	rec_end(f, tag, res);
	if (res < 0)
		fuse_reply_err(req, -res);
	else
		fuse_reply_buf(req, buf, res);
}

static void fx_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
		     struct fuse_file_info *fi)
{
	struct us_fuse *f = fuse_req_userdata(req);
	size_t len;
	unsigned tag;
	int res;

	(void)ino; (void)fi;
	if (off < 0) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	len = on_device(f, off, size);
	tag = rec_begin(f, UBLK_IO_OP_WRITE, off, len ? len : size);
	if (!len && size)
		res = -ENOSPC;	/* at or past the end: the disk cannot grow */
	else if (tgt_is(f, "null"))
		res = (int)len;
	else if ((res = us_pwrite_full(f->cfg.backing_fd, buf, len, off)) == 0)
		res = (int)len;
	rec_end(f, tag, res);
	if (res < 0)
		fuse_reply_err(req, -res);
	else
		fuse_reply_write(req, res);
}

static void fx_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
	struct us_fuse *f = fuse_req_userdata(req);
	unsigned tag;
	int res;

	(void)ino; (void)datasync; (void)fi;
	tag = rec_begin(f, UBLK_IO_OP_FLUSH, 0, 0);
	res = do_flush(f);
	rec_end(f, tag, res);
	fuse_reply_err(req, -res);
}

static void fx_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len,
			 struct fuse_file_info *fi)
{
	struct us_fuse *f = fuse_req_userdata(req);
	uint32_t op_flags;
	unsigned tag;
	int res;

	(void)ino; (void)fi;
	if (off < 0 || len <= 0) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	if ((uint64_t)off >= f->cfg.dev_bytes || (uint64_t)len > f->cfg.dev_bytes - off) {
		/* a block device cannot grow; within it, the range is already allocated */
		fuse_reply_err(req, (mode & ~FALLOC_FL_KEEP_SIZE) ? EINVAL : ENOSPC);
		return;
	}
	if (mode & FALLOC_FL_PUNCH_HOLE)
		op_flags = UBLK_IO_OP_DISCARD;
	else if (mode & FALLOC_FL_ZERO_RANGE)
		/* the loop driver asks for a zero range when unmapping is not allowed */
		op_flags = UBLK_IO_OP_WRITE_ZEROES | UBLK_IO_F_NOUNMAP;
	else if (mode & FALLOC_FL_WRITE_ZEROES)
		op_flags = UBLK_IO_OP_WRITE_ZEROES | UBLK_IO_F_NOUNMAP;
	else if (!(mode & ~FALLOC_FL_KEEP_SIZE)) {
		fuse_reply_err(req, 0);	/* preallocation inside the device: nothing to do */
		return;
	} else {
		fuse_reply_err(req, EOPNOTSUPP);
		return;
	}
	tag = rec_begin(f, op_flags, off, len);
	if ((op_flags & 0xff) == UBLK_IO_OP_DISCARD)
		res = do_discard(f, off, len);
	else
		res = do_write_zeroes(f, off, len);
	rec_end(f, tag, res);
	fuse_reply_err(req, -res);
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
	if (f->se)
		fuse_session_destroy(f->se);
	pthread_mutex_destroy(&f->rec_lock);
	pthread_cond_destroy(&f->tag_freed);
	pthread_mutex_destroy(&f->done_lock);
	pthread_cond_destroy(&f->done_cond);
	free(f->ios);
	free(f->tag_busy);
	free(f->zeros);
	free(f->mountpoint);
	free(f);
}

struct us_fuse *us_fuse_start(const struct us_fuse_cfg *cfg, const char *mountpoint,
			      const char *fsname, char *err, int errlen)
{
	struct us_fuse *f;
	struct fuse_args args = FUSE_ARGS_INIT(0, NULL);
	pthread_condattr_t ca;
	char opts[512];
	int rc;

	pthread_once(&buf_once, tbuf_init);
	if (!cfg->depth || !cfg->max_threads || cfg->max_threads > cfg->depth || !cfg->dev_bytes ||
	    !cfg->max_io_bytes) {
		snprintf(err, errlen, "bad FUSE transport configuration");
		return NULL;
	}
	f = calloc(1, sizeof(*f));
	if (!f) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	f->cfg = *cfg;
	clock_gettime(CLOCK_REALTIME, &f->t0);
	pthread_mutex_init(&f->rec_lock, NULL);
	pthread_cond_init(&f->tag_freed, NULL);
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
		pthread_mutex_destroy(&f->rec_lock);
		pthread_cond_destroy(&f->tag_freed);
		pthread_mutex_destroy(&f->done_lock);
		free(f);
		return NULL;
	}
	f->mountpoint = strdup(mountpoint);
	f->ios = calloc(cfg->depth, sizeof(*f->ios));
	f->tag_busy = calloc(cfg->depth, 1);
	f->zeros = calloc(1, ZERO_CHUNK);
	if (!f->mountpoint || !f->ios || !f->tag_busy || !f->zeros) {
		snprintf(err, errlen, "out of memory");
		fx_release_all(f);
		return NULL;
	}
	f->q.q_id = 0;
	if (cfg->shm)
		us_shm_attach(&f->q, cfg->shm);

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
