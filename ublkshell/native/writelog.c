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
#include <stdio.h>
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
	if (pthread_mutex_init(&w->lock, NULL)) {
		free(w);
		return NULL;
	}
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
static void wlog_begin(struct us_wlog *w, struct us_io *io)
{
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
static void wlog_end(struct us_wlog *w, struct us_io *io)
{
	struct us_wlog_entry *e, *next;

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

void us_wlog_begin(struct us_queue *q, struct us_io *io)
{
	wlog_begin(q->dev->wlog, io);
}

void us_wlog_end(struct us_queue *q, struct us_io *io, int result)
{
	(void)result;
	wlog_end(q->dev->wlog, io);
}

static int cmp_u64(const void *x, const void *y)
{
	uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;

	return a < b ? -1 : a > b;
}

/* the index of sector s in the sorted bounds b[0..m) (s is one of them) */
static size_t bound_at(const uint64_t *b, size_t m, uint64_t s)
{
	size_t lo = 0, hi = m;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (b[mid] < s)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

/*
 * After the queues have stopped: undo, newest first, every write that is not
 * durable (unless drawn to be kept). Which sectors a kept newer write owns is
 * kept per segment between the entries' own start and end sectors, so memory
 * goes with the number of logged writes, never with how far apart they lie.
 */
int us_wlog_powercut(struct us_wlog *w, uint32_t keep_ppm, uint64_t seed,
		     struct us_fault_area *report)
{
	struct us_wlog_entry *e;
	uint64_t rng = seed ^ 0x5bd1e9955bd1e995ULL, *b;
	uint8_t *owned;
	size_t n = 0, m = 0, i;
	uint32_t dropped = 0, kept = 0, failed = 0;
	uint64_t dropped_bytes = 0;
	int first_err = 0, rc;

	pthread_mutex_lock(&w->lock);
	for (e = w->head; e; e = e->next)
		n++;
	b = malloc((2 * n + 1) * sizeof(*b));
	owned = calloc(2 * n + 1, 1);
	if (!b || !owned) {
		pthread_mutex_unlock(&w->lock);
		free(b);
		free(owned);
		return -ENOMEM;
	}
	for (e = w->head; e; e = e->next) {
		b[m++] = e->sector;
		b[m++] = e->sector + e->sectors;
	}
	qsort(b, m, sizeof(*b), cmp_u64);
	for (i = n = 0; i < m; i++)
		if (!n || b[i] != b[n - 1])
			b[n++] = b[i];
	m = n;	/* segment k is [b[k], b[k + 1]): owned[k] = a kept newer write has it */

	for (e = w->tail; e; e = e->prev) {
		size_t k0 = bound_at(b, m, e->sector), k1 = bound_at(b, m, e->sector + e->sectors), k, j;
		uint64_t r = 0;
		int keep, bad = 0;

		if (keep_ppm)
			r = (uint64_t)(((__uint128_t)(rng = rng * 6364136223846793005ULL +
				1442695040888963407ULL) >> 32) % 1000000);
		keep = (e->fua && e->done) || (keep_ppm && r < keep_ppm);
		if (keep) {
			memset(owned + k0, 1, k1 - k0);
			kept++;
			continue;
		}
		/* put back each run of segments no kept newer write owns */
		for (k = k0; k < k1; k = j) {
			if (owned[k]) {
				j = k + 1;
				continue;
			}
			for (j = k; j < k1 && !owned[j]; j++)
				;
			rc = us_pwrite_full(w->fd, e->data + ((b[k] - e->sector) << 9),
					    (size_t)(b[j] - b[k]) << 9, (off_t)(b[k] << 9));
			if (rc && !bad) {
				bad = 1;
				if (!first_err)
					first_err = -rc;
			}
		}
		/* a failed undo leaves old, new or mixed data: never count it as dropped */
		if (bad) {
			failed++;
		} else {
			dropped++;
			dropped_bytes += (uint64_t)e->sectors << 9;
		}
	}
	free(owned);
	free(b);
	while (w->head)
		unlink_entry(w, w->head);
	pthread_mutex_unlock(&w->lock);
	/*
	 * Undos that never reached the media are not undone. EINVAL and EROFS
	 * say the file has no syncing at all (nothing to wait for), not that
	 * data was lost.
	 */
	if (fsync(w->fd) < 0 && errno != EINVAL && errno != EROFS) {
		if (!first_err)
			first_err = errno;
		failed += dropped;
		dropped = 0;
		dropped_bytes = 0;
	}
	if (failed)
		fprintf(stderr, "ublkshell: powercut: %u unflushed write%s could not be undone: %s\n",
			failed, failed == 1 ? "" : "s", strerror(first_err));
	if (report) {
		report->pc_dropped = dropped;
		report->pc_kept = kept;
		report->pc_failed = failed;
		report->pc_errno = first_err;
		report->pc_dropped_bytes = dropped_bytes;
		__atomic_store_n(&report->pc_done, 1, __ATOMIC_RELEASE);
	}
	return (int)dropped;
}

int us_dev_powercut(struct us_dev *d, uint32_t keep_ppm, uint64_t seed,
		    struct us_fault_area *report)
{
	return d->wlog ? us_wlog_powercut(d->wlog, keep_ppm, seed, report) : -EOPNOTSUPP;
}

/* ---- tests -------------------------------------------------------------- */

void *us_wlog_test_begin(struct us_wlog *w, uint32_t op_flags, uint64_t sector, uint32_t nr_sectors)
{
	struct us_io *io = calloc(1, sizeof(*io));

	if (!io)
		return NULL;
	io->op_flags = op_flags;
	io->start_sector = sector;
	io->nr_sectors = nr_sectors;
	wlog_begin(w, io);
	return io;
}

void us_wlog_test_end(struct us_wlog *w, void *io, int completed)
{
	if (completed)
		wlog_end(w, io);
	free(io);
}
