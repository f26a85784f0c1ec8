/* SPDX-License-Identifier: MIT */
/*
 * The --log-writes writer thread: what the queue threads made ready goes to
 * the log file in dm-log-writes' layout (crash/logwrites.py reads it): the
 * super block in the first sector, then per entry one sector of header (a
 * mark's name inside it) and, for a write, its data. The super block is
 * rewritten after each batch, so it never counts an entry not yet whole.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/uio.h>

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

int lw_write_super(struct us_lwlog *lw)
{
	struct lw_super s = { LW_MAGIC, LW_VERSION, lw->entries, lw->sectorsize };
	struct iovec iov[2] = {
		{ &s, sizeof(s) },
		{ lw->zero, lw->sectorsize - sizeof(s) },
	};

	return write_all(lw->fd, iov, 2, 0);
}

/* the entry's header sector, then its data (a mark's name is inside the header) */
static int write_block(struct us_lwlog *lw, struct lw_block *b)
{
	int n = 0, mark = !!(b->flags & LW_MARK);
	/* data_len counts only a mark's name, as the kernel's target writes it: data is nr_sectors */
	struct lw_entry e = { b->sector, b->nr_sectors, b->flags, mark ? b->data_len : 0 };
	struct iovec iov[4];
	uint64_t off = lw->next_off, left;
	int r;

	iov[n++] = (struct iovec){ &e, sizeof(e) };
	if (mark)
		iov[n++] = (struct iovec){ b->data, b->data_len };
	iov[n++] = (struct iovec){ lw->zero, lw->sectorsize - sizeof(e) - (mark ? b->data_len : 0) };
	/* header and data in one call: the log's writes are most of its cost */
	if (!mark && !b->zeroes && b->data_len)
		iov[n++] = (struct iovec){ b->data, b->data_len };
	r = write_all(lw->fd, iov, n, off);
	if (r)
		return r;
	off += lw->sectorsize + (mark || b->zeroes ? 0 : b->data_len);
	/* zeroes go out a sector buffer at a time: they were never stored */
	for (left = b->zeroes ? b->data_len : 0; !r && left; ) {
		size_t k = left < lw->zero_len ? left : lw->zero_len;

		iov[0] = (struct iovec){ lw->zero, k };
		r = write_all(lw->fd, iov, 1, off);
		off += k;
		left -= k;
	}
	if (!r)
		lw->next_off = off;
	return r;
}

/* the writer: a FLUSH's captured writes, then the FLUSH, in list order */
static int write_chain(struct us_lwlog *lw, struct lw_block *b, int *super)
{
	int r = 0;

	for (; b && !r; b = b->next) {
		if (b->cap_head)
			r = write_chain(lw, b->cap_head, super);
		if (r)
			break;
		r = write_block(lw, b);
		if (!r) {
			if (b->flags & LW_MARK)
				lw->last_mark = lw->entries;
			lw->entries++;
			if (b->flags & (LW_FUA | LW_MARK | LW_FLUSH))
				*super = 1;
		}
	}
	return r;
}

void *lw_writer(void *arg)
{
	struct us_lwlog *lw = arg;

	pthread_mutex_lock(&lw->lock);
	for (;;) {
		struct lw_block *chain;
		int r, super = 0;

		while (!lw->ready.head && !lw->stop)
			pthread_cond_wait(&lw->work, &lw->lock);
		if (!lw->ready.head)
			break;
		chain = lw->ready.head;
		lw->ready.head = lw->ready.tail = NULL;
		lw->busy = 1;
		pthread_mutex_unlock(&lw->lock);

		r = lw->error ? 0 : write_chain(lw, chain, &super);
		/* the super block counts what is complete: a reader never sees half an entry */
		if (!r && super)
			r = lw_write_super(lw);

		pthread_mutex_lock(&lw->lock);
		lw_free_chain(lw, chain);
		lw->busy = 0;
		if (r)
			lw_stop_logging(lw, r);
		pthread_cond_broadcast(&lw->idle);
	}
	pthread_mutex_unlock(&lw->lock);
	return NULL;
}
