/* SPDX-License-Identifier: MIT */
/*
 * The --log-writes writer thread: what the queue threads made ready goes to
 * the log file in dm-log-writes' layout (crash/logwrites.py reads it): the
 * super block in the first sector, then per entry one sector of header (a
 * mark's name inside it) and, for a write, its data. Also the log's life:
 * open (the thread starts) and close (what is left is written, or dropped
 * after a deadline).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/uio.h>

#include "ushell.h"
#include "logwrites_int.h"

static int write_all(int fd, struct iovec *iov, int n, uint64_t off)
{
	while (n) {
		ssize_t r = pwritev(fd, iov, n, (off_t)off);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			return errno;
		}
		if (r == 0)
			return EIO;
		off += (uint64_t)r;
		while (n && (size_t)r >= iov->iov_len) {
			r -= (ssize_t)iov->iov_len;
			iov++;
			n--;
		}
		if (n) {
			iov->iov_base = (char *)iov->iov_base + r;
			iov->iov_len -= (size_t)r;
		}
	}
	return 0;
}

int lw_write_super(struct us_lwlog *lw, uint64_t n)
{
	struct lw_super s = { LW_MAGIC, LW_VERSION, n, lw->sectorsize };
	struct iovec iov[2] = {
		{ &s, sizeof(s) },
		{ lw->zero, lw->sectorsize - sizeof(s) },
	};

	return write_all(lw->fd, iov, 2, 0);
}

/*
 * Entries lie one after the other in the file, so the writer gathers many
 * into one pwritev: under emulation a syscall per entry costs more than the
 * data. Blocks stay alive until their chain is written, and the headers
 * live here until the call.
 */
#define ACC_IOV		1024
#define ACC_HDRS	(ACC_IOV / 3)

struct acc {
	struct iovec	iov[ACC_IOV];
	struct lw_entry	hdr[ACC_HDRS];
	int		n, nh;
	uint64_t	start, len;	/* where the gathered entries go, and their bytes */
	uint64_t	entries;
};

/* write what is gathered; entries and next_off then count it */
static int acc_flush(struct us_lwlog *lw, struct acc *a)
{
	int r = a->n ? write_all(lw->fd, a->iov, a->n, a->start) : 0;

	if (!r && a->entries) {
		pthread_mutex_lock(&lw->lock);
		lw->next_off = a->start + a->len;
		lw->entries += a->entries;
		pthread_mutex_unlock(&lw->lock);
	}
	a->start += a->len;
	a->n = a->nh = 0;
	a->len = a->entries = 0;
	return r;
}

/* a WRITE_ZEROES's zeroes, a buffer at a time: they were never stored */
static int write_zeroes(struct us_lwlog *lw, struct acc *a, uint64_t left)
{
	int r = 0;

	while (!r && left) {
		size_t k = left < lw->zero_len ? left : lw->zero_len;
		struct iovec iov = { lw->zero, k };

		r = write_all(lw->fd, &iov, 1, a->start);
		a->start += k;
		left -= k;
	}
	if (!r) {
		pthread_mutex_lock(&lw->lock);
		lw->next_off = a->start;
		pthread_mutex_unlock(&lw->lock);
	}
	return r;
}

/* the entry's header sector (a mark's name inside it), then its data */
static int add_block(struct us_lwlog *lw, struct acc *a, struct lw_block *b)
{
	int mark = !!(b->flags & LW_MARK), r;
	struct lw_entry *e;

	if (a->n + 4 > ACC_IOV || a->nh == ACC_HDRS) {
		r = acc_flush(lw, a);
		if (r)
			return r;
	}
	e = &a->hdr[a->nh++];
	/* data_len counts only a mark's name, as the kernel's target writes it: data is nr_sectors */
	*e = (struct lw_entry){ b->sector, b->nr_sectors, b->flags, mark ? b->data_len : 0 };
	a->iov[a->n++] = (struct iovec){ e, sizeof(*e) };
	if (mark)
		a->iov[a->n++] = (struct iovec){ b->data, b->data_len };
	a->iov[a->n++] = (struct iovec){ lw->zero, lw->sectorsize - sizeof(*e) - (mark ? b->data_len : 0) };
	a->len += lw->sectorsize;
	if (!mark && !b->zeroes && b->data_len) {
		a->iov[a->n++] = (struct iovec){ b->data, b->data_len };
		a->len += b->data_len;
	}
	a->entries++;
	if (b->zeroes && b->data_len) {
		r = acc_flush(lw, a);
		if (!r)
			r = write_zeroes(lw, a, b->data_len);
		if (r)
			return r;
	}
	return 0;
}

/*
 * After a FLUSH, FUA write or mark (as the kernel does after FUA writes and
 * marks): what is gathered goes out, then the super block, so a reader and a
 * killed daemon's log count every persistence point written so far, never
 * half an entry.
 */
static int persist(struct us_lwlog *lw, struct acc *a, struct lw_block *b)
{
	uint64_t n;
	int r = acc_flush(lw, a);

	if (r)
		return r;
	pthread_mutex_lock(&lw->lock);
	n = lw->entries;
	pthread_mutex_unlock(&lw->lock);
	r = lw_write_super(lw, n);
	if (r)
		return r;
	pthread_mutex_lock(&lw->lock);
	lw->counted = n;
	if (b->flags & LW_MARK) {
		lw->last_mark = n - 1;
		lw->mark_done = b->seq;
		pthread_cond_broadcast(&lw->idle);
	}
	pthread_mutex_unlock(&lw->lock);
	return 0;
}

static int gone(struct us_lwlog *lw)
{
	return __atomic_load_n(&lw->error, __ATOMIC_RELAXED) || __atomic_load_n(&lw->abandon, __ATOMIC_RELAXED);
}

/* a FLUSH's captured writes, then the FLUSH, in list order; stops once logging has */
static int write_chain(struct us_lwlog *lw, struct acc *a, struct lw_block *b)
{
	int r = 0;

	for (; b && !r && !gone(lw); b = b->next) {
		if (b->cap_head)
			r = write_chain(lw, a, b->cap_head);
		if (r || gone(lw))
			break;
		r = add_block(lw, a, b);
		if (!r && b->flags & (LW_FUA | LW_MARK | LW_FLUSH))
			r = persist(lw, a, b);
	}
	return r;
}

void *lw_writer(void *arg)
{
	struct us_lwlog *lw = arg;
	struct acc *a = calloc(1, sizeof(*a));

	if (!a) {
		pthread_mutex_lock(&lw->lock);
		lw_stop_logging(lw, ENOMEM);
		pthread_mutex_unlock(&lw->lock);
	}
	pthread_mutex_lock(&lw->lock);
	for (;;) {
		struct lw_block *chain;
		int r;

		while ((!lw->ready.head || !a) && !lw->stop)
			pthread_cond_wait(&lw->work, &lw->lock);
		if (!lw->ready.head || !a)
			break;
		chain = lw->ready.head;
		lw->ready.head = lw->ready.tail = NULL;
		lw->busy = 1;
		pthread_mutex_unlock(&lw->lock);

		a->start = lw->next_off;
		r = write_chain(lw, a, chain);
		if (!r && !gone(lw))
			r = acc_flush(lw, a);
		a->n = a->nh = 0;
		a->len = a->entries = 0;

		pthread_mutex_lock(&lw->lock);
		lw_free_chain(lw, chain);
		lw->busy = 0;
		if (r)
			lw_stop_logging(lw, r);
		pthread_cond_broadcast(&lw->idle);
	}
	pthread_mutex_unlock(&lw->lock);
	free(a);
	return NULL;
}

struct us_lwlog *us_lw_open(int fd, uint32_t sectorsize, uint64_t entries, uint64_t next_off,
			    uint64_t limit, int *err)
{
	struct us_lwlog *lw;

	*err = -EINVAL;
	if (sectorsize < 512 || sectorsize > 4096 || (sectorsize & (sectorsize - 1)) ||
	    (next_off && next_off < sectorsize) || next_off % sectorsize)
		return NULL;
	*err = -ENOMEM;
	lw = calloc(1, sizeof(*lw));
	if (!lw)
		return NULL;
	lw->zero_len = 1 << 20;
	lw->zero = calloc(1, lw->zero_len);
	if (!lw->zero)
		goto fail;
	lw->fd = fd;
	lw->sectorsize = sectorsize;
	for (lw->shift = 0; (512U << lw->shift) < sectorsize; lw->shift++)
		;
	lw->entries = lw->counted = entries;
	lw->next_off = next_off ? next_off : sectorsize;
	lw->limit = limit;
	if (pthread_mutex_init(&lw->lock, NULL))
		goto fail;
	pthread_cond_init(&lw->work, NULL);
	pthread_cond_init(&lw->idle, NULL);
	/* a valid (empty or adopted) log before the first IO: replay reads it at once */
	*err = -lw_write_super(lw, entries);
	if (*err)
		goto fail_sync;
	if (pthread_create(&lw->thr, NULL, lw_writer, lw)) {
		*err = -EAGAIN;
		goto fail_sync;
	}
	*err = 0;
	return lw;
fail_sync:
	pthread_cond_destroy(&lw->work);
	pthread_cond_destroy(&lw->idle);
	pthread_mutex_destroy(&lw->lock);
fail:
	free(lw->zero);
	free(lw);
	return NULL;
}

/* under lock: wait until the writer has written everything queued before this call */
static int drain_locked(struct us_lwlog *lw, int timeout_ms)
{
	struct timespec until;

	lw_deadline(&until, timeout_ms);
	while ((lw->ready.head || lw->busy) && !lw->error)
		if (pthread_cond_timedwait(&lw->idle, &lw->lock, &until) == ETIMEDOUT)
			return -ETIMEDOUT;
	return lw->error ? -lw->error : 0;
}

int us_lw_sync(struct us_lwlog *lw, int timeout_ms)
{
	int r;

	pthread_mutex_lock(&lw->lock);
	r = drain_locked(lw, timeout_ms);
	pthread_mutex_unlock(&lw->lock);
	return r;
}

int us_lw_close(struct us_lwlog *lw, const char *end_mark, int timeout_ms)
{
	int r;

	if (!lw)
		return 0;
	pthread_mutex_lock(&lw->lock);
	/* as dm-log-writes' teardown: writes never flushed still happened to the device */
	if (end_mark && !lw->error)
		lw_list_splice(&lw->ready, &lw->held);
	pthread_mutex_unlock(&lw->lock);
	if (end_mark && *end_mark)
		us_lw_mark(lw, end_mark, timeout_ms, NULL);
	pthread_mutex_lock(&lw->lock);
	/* a writer that cannot finish in time drops the rest: the log stays valid where it ends */
	if (drain_locked(lw, timeout_ms) == -ETIMEDOUT) {
		__atomic_store_n(&lw->abandon, 1, __ATOMIC_RELAXED);
		if (!lw->error)
			__atomic_store_n(&lw->error, ETIMEDOUT, __ATOMIC_RELAXED);
	}
	lw->stop = 1;
	pthread_cond_signal(&lw->work);
	pthread_mutex_unlock(&lw->lock);
	pthread_join(lw->thr, NULL);
	r = lw->error;
	if (!r)
		r = lw_write_super(lw, lw->entries);
	if (fsync(lw->fd) < 0 && errno != EINVAL && !r)
		r = errno;
	pthread_mutex_lock(&lw->lock);
	lw_free_chain(lw, lw->held.head);
	lw_free_chain(lw, lw->ready.head);
	pthread_mutex_unlock(&lw->lock);
	pthread_cond_destroy(&lw->work);
	pthread_cond_destroy(&lw->idle);
	pthread_mutex_destroy(&lw->lock);
	free(lw->zero);
	free(lw);
	return -r;
}
