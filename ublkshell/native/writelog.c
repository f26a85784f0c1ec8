/* SPDX-License-Identifier: MIT */
/*
 * The write log behind `powercut`: for devices added with --powercut, every
 * write keeps the data it overwrites until a FLUSH makes it durable. A power
 * cut stops the queues and puts the old data back for every write that was
 * not yet durable (or for a random subset of them), so the backing store holds
 * what a disk with a volatile cache could hold after losing power.
 *
 * Which states are legal: a write acknowledged before a FLUSH was received is
 * durable once that FLUSH completes; a FUA write is durable when acknowledged;
 * any other write may or may not have reached the media, independently of the
 * others. Undoing newest first, and never undoing sectors that a kept newer
 * write owns, gives exactly "the durable state plus a subset of the rest
 * applied in order".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ushell.h"

struct us_wlog_entry {
	struct us_wlog_entry *prev, *next;	/* issue order: head oldest */
	uint64_t	sector;
	uint32_t	sectors;
	uint32_t	flush_mark;	/* the first FLUSH received after this write was done */
	uint8_t		done;
	uint8_t		fua;
	char		data[];		/* what the write overwrote */
};

struct us_wlog {
	pthread_mutex_t	lock;
	struct us_wlog_entry *head, *tail;
	uint64_t	bytes, limit;
	uint32_t	next_flush;
	uint64_t	forgotten;	/* entries let go to stay under the limit */
	int		fd;
};

struct us_wlog *us_wlog_new(int fd, uint64_t limit)
{
	struct us_wlog *w = calloc(1, sizeof(*w));

	if (!w)
		return NULL;
	pthread_mutex_init(&w->lock, NULL);
	w->fd = fd;
	w->limit = limit;
	return w;
}

static void unlink_entry(struct us_wlog *w, struct us_wlog_entry *e)
{
	if (e->prev)
		e->prev->next = e->next;
	else
		w->head = e->next;
	if (e->next)
		e->next->prev = e->prev;
	else
		w->tail = e->prev;
	w->bytes -= (uint64_t)e->sectors << 9;
	free(e);
}

void us_wlog_free(struct us_wlog *w)
{
	if (!w)
		return;
	while (w->head)
		unlink_entry(w, w->head);
	pthread_mutex_destroy(&w->lock);
	free(w);
}

/* the target is about to run io: remember what it overwrites, or where a FLUSH stands */
void us_wlog_begin(struct us_queue *q, struct us_io *io)
{
	struct us_wlog *w = q->dev->wlog;
	unsigned op = io->op_flags & 0xff;
	struct us_wlog_entry *e, *n;
	size_t len = (size_t)io->nr_sectors << 9;

	io->wlog = NULL;
	io->flush_mark = 0;
	/* a commit linked behind the target's SQE would skip us_wlog_end */
	io->fh.nolink = 1;
	if (op == UBLK_IO_OP_FLUSH) {
		pthread_mutex_lock(&w->lock);
		io->flush_mark = ++w->next_flush;
		for (e = w->head; e; e = e->next)
			if (e->done && !e->flush_mark)
				e->flush_mark = io->flush_mark;
		pthread_mutex_unlock(&w->lock);
		return;
	}
	/* discarded data may read back as anything: nothing to restore */
	if ((op != UBLK_IO_OP_WRITE && op != UBLK_IO_OP_WRITE_ZEROES) || !len)
		return;
	e = malloc(sizeof(*e) + len);
	if (!e)
		return;	/* the write stays unlogged: a power cut keeps it, still a legal state */
	memset(e, 0, sizeof(*e));
	e->sector = io->start_sector;
	e->sectors = io->nr_sectors;
	e->fua = !!(io->op_flags & UBLK_IO_F_FUA);
	if (us_pread_zero(w->fd, e->data, len, (off_t)e->sector << 9)) {
		free(e);
		return;
	}
	pthread_mutex_lock(&w->lock);
	/* over the limit: the oldest finished writes count as having reached the media */
	for (n = w->head; n && w->bytes + len > w->limit; ) {
		struct us_wlog_entry *next = n->next;

		if (n->done) {
			unlink_entry(w, n);
			w->forgotten++;
		}
		n = next;
	}
	e->prev = w->tail;
	if (w->tail)
		w->tail->next = e;
	else
		w->head = e;
	w->tail = e;
	w->bytes += len;
	pthread_mutex_unlock(&w->lock);
	io->wlog = e;
}

/* the result goes back to the driver now */
void us_wlog_end(struct us_queue *q, struct us_io *io, int result)
{
	struct us_wlog *w = q->dev->wlog;
	struct us_wlog_entry *e, *next;

	(void)result;
	pthread_mutex_lock(&w->lock);
	if (io->wlog) {
		((struct us_wlog_entry *)io->wlog)->done = 1;
		io->wlog = NULL;
	}
	if (io->flush_mark) {
		/* everything done before this FLUSH (or an earlier one) arrived is durable */
		for (e = w->head; e; e = next) {
			next = e->next;
			if (e->flush_mark && e->flush_mark <= io->flush_mark)
				unlink_entry(w, e);
		}
		io->flush_mark = 0;
	}
	pthread_mutex_unlock(&w->lock);
}

static void put_back(int fd, const struct us_wlog_entry *e, uint64_t s, uint64_t n)
{
	const char *p = e->data + ((s - e->sector) << 9);
	size_t len = n << 9, done = 0;
	ssize_t r;

	while (done < len) {
		r = pwrite(fd, p + done, len - done, (off_t)(s << 9) + done);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return;
		done += r;
	}
}

int us_dev_powercut(struct us_dev *d, uint32_t keep_ppm, uint64_t seed,
		    struct us_fault_area *report)
{
	struct us_wlog *w = d->wlog;
	struct us_wlog_entry *e;
	uint64_t lo = UINT64_MAX, hi = 0, rng = seed ^ 0x5bd1e9955bd1e995ULL, s, nbits;
	uint64_t *owned;
	uint32_t dropped = 0, kept = 0;
	uint64_t dropped_bytes = 0;

	if (!w)
		return -EOPNOTSUPP;
	pthread_mutex_lock(&w->lock);
	for (e = w->head; e; e = e->next) {
		if (e->sector < lo)
			lo = e->sector;
		if (e->sector + e->sectors > hi)
			hi = e->sector + e->sectors;
	}
	nbits = hi > lo ? hi - lo : 0;
	/* one bit per sector the log touches: set = a kept newer write owns it */
	owned = calloc(nbits / 64 + 1, sizeof(uint64_t));
	if (!owned) {
		pthread_mutex_unlock(&w->lock);
		return -ENOMEM;
	}
	for (e = w->tail; e; e = e->prev) {
		uint64_t r = 0;
		int keep;

		if (keep_ppm)
			r = (uint64_t)(((__uint128_t)(rng = rng * 6364136223846793005ULL +
				1442695040888963407ULL) >> 32) % 1000000);
		keep = (e->fua && e->done) || (keep_ppm && r < keep_ppm);
		if (keep) {
			for (s = e->sector; s < e->sector + e->sectors; s++)
				owned[(s - lo) / 64] |= 1ULL << ((s - lo) % 64);
			kept++;
			continue;
		}
		/* restore runs of sectors no kept newer write owns */
		for (s = e->sector; s < e->sector + e->sectors; ) {
			uint64_t run = 0;

			while (s + run < e->sector + e->sectors &&
			       !(owned[(s + run - lo) / 64] & (1ULL << ((s + run - lo) % 64))))
				run++;
			if (run) {
				put_back(w->fd, e, s, run);
				s += run;
			} else {
				s++;
			}
		}
		dropped++;
		dropped_bytes += (uint64_t)e->sectors << 9;
	}
	free(owned);
	while (w->head)
		unlink_entry(w, w->head);
	pthread_mutex_unlock(&w->lock);
	fsync(w->fd);
	if (report) {
		report->pc_dropped = dropped;
		report->pc_kept = kept;
		report->pc_dropped_bytes = dropped_bytes;
		__atomic_store_n(&report->pc_done, 1, __ATOMIC_RELEASE);
	}
	return (int)dropped;
}
