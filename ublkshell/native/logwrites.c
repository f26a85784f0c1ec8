/* SPDX-License-Identifier: MIT */
/*
 * add --log-writes: every write the device completes, in dm-log-writes' on-disk
 * format (crash/logwrites.py reads it), so that `replay`, fstests' replay-log
 * and our own crash checker can rebuild the device as it stood at any flush.
 *
 * The order is dm-log-writes' order, which is the order data reaches stable
 * media on a disk with a volatile cache: a completed WRITE, DISCARD or
 * WRITE_ZEROES waits in memory ("held") until a FLUSH that arrives after it
 * completes; then it is logged, followed by the FLUSH. A FUA write is logged
 * as soon as it completes. A failed FLUSH leaves the writes it captured held
 * for the next one. Marks go after what is logged so far, never after held
 * writes. WRITE_ZEROES is logged as a write of zeroes, as the kernel's target
 * sees it (it emulates write-zeroes by writing zero pages).
 *
 * What is logged is what reached the store: a write a fault failed or dropped
 * never touched it, so the log leaves it out; a torn write is logged as the
 * part the target wrote. A replay rebuilds what the store holds.
 *
 * Queue threads copy a write's data once, when the target starts (as the
 * kernel's target copies at map time), and link blocks under a mutex; one
 * writer thread per device appends to the file (logwrites_file.c), so the IO
 * never waits for the log's disk. Memory is bounded: past the limit (writes held without a
 * flush, or a writer that cannot keep up) logging stops for good, the log
 * stays valid up to its last counted entry, and the status says why.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/uio.h>

#include "ushell.h"
#include "logwrites_int.h"

static void list_add(struct lw_list *l, struct lw_block *b)
{
	b->next = NULL;
	if (l->tail)
		l->tail->next = b;
	else
		l->head = b;
	l->tail = b;
}

/* move all of from behind to */
void lw_list_splice(struct lw_list *to, struct lw_list *from)
{
	if (!from->head)
		return;
	if (to->tail)
		to->tail->next = from->head;
	else
		to->head = from->head;
	to->tail = from->tail;
	from->head = from->tail = NULL;
}

/* what a block holds against the memory bound: itself and a WRITE's data */
static uint64_t block_bytes(const struct lw_block *b)
{
	return b->charged ? sizeof(*b) + (b->zeroes || (b->flags & LW_MARK) ? 0 : b->data_len) : 0;
}

void lw_free_chain(struct us_lwlog *lw, struct lw_block *b)
{
	while (b) {
		struct lw_block *next = b->next;

		lw_free_chain(lw, b->cap_head);
		lw->bytes -= block_bytes(b);
		free(b);
		b = next;
	}
}

/* under lock: logging ends for good; what is not yet written is dropped */
void lw_stop_logging(struct us_lwlog *lw, int err)
{
	if (!lw->error)
		__atomic_store_n(&lw->error, err, __ATOMIC_RELAXED);	/* the writer looks between blocks */
	lw_free_chain(lw, lw->held.head);
	lw->held.head = lw->held.tail = NULL;
	lw_free_chain(lw, lw->ready.head);
	lw->ready.head = lw->ready.tail = NULL;
	pthread_cond_broadcast(&lw->idle);
}

/* under lock: count a block against the limit; 0 if logging goes on */
static int charge(struct us_lwlog *lw, struct lw_block *b)
{
	uint64_t len;

	if (lw->error)
		return -1;
	b->charged = 1;
	len = block_bytes(b);
	if (lw->bytes + len > lw->limit) {
		b->charged = 0;
		lw_stop_logging(lw, ENOBUFS);
		return -1;
	}
	lw->bytes += len;
	if (lw->bytes > lw->held_max)
		lw->held_max = lw->bytes;
	return 0;
}

/*
 * The target is about to run io: note what it will change, and take a WRITE's
 * data now, as the kernel's target does at map time (a torn fault has already
 * cut nr_sectors to what the store will get).
 */
static void lw_begin(struct us_lwlog *lw, struct us_io *io)
{
	unsigned op = io->op_flags & 0xff;
	uint32_t mask = (1U << lw->shift) - 1;
	size_t len = (size_t)io->nr_sectors << 9;
	struct lw_block *b;

	io->lw = NULL;
	/* a commit linked behind the target's SQE would skip io_end's logging */
	io->fh.nolink = 1;
	if (op != UBLK_IO_OP_FLUSH && op != UBLK_IO_OP_WRITE && op != UBLK_IO_OP_DISCARD &&
	    op != UBLK_IO_OP_WRITE_ZEROES)
		return;
	if ((op != UBLK_IO_OP_FLUSH && !io->nr_sectors) || __atomic_load_n(&lw->error, __ATOMIC_RELAXED))
		return;
	if (op != UBLK_IO_OP_FLUSH && ((io->start_sector | io->nr_sectors) & mask)) {
		/* the log counts in the device's blocks: a smaller IO cannot be written down */
		pthread_mutex_lock(&lw->lock);
		lw_stop_logging(lw, EINVAL);
		pthread_mutex_unlock(&lw->lock);
		return;
	}
	b = malloc(sizeof(*b) + (op == UBLK_IO_OP_WRITE ? len : 0));
	if (b) {
		memset(b, 0, sizeof(*b));
		b->sector = io->start_sector >> lw->shift;
		b->nr_sectors = io->nr_sectors >> lw->shift;
		if (op == UBLK_IO_OP_FLUSH) {
			b->flags = LW_FLUSH;
		} else if (op == UBLK_IO_OP_DISCARD) {
			b->flags = LW_DISCARD;
		} else {
			b->data_len = len;
			b->zeroes = op == UBLK_IO_OP_WRITE_ZEROES;
			if (!b->zeroes)
				memcpy(b->data, io->buf, len);
			if (io->op_flags & UBLK_IO_F_FUA)
				b->flags = LW_FUA;
		}
		if (op != UBLK_IO_OP_FLUSH && io->op_flags & UBLK_IO_F_META)
			b->flags |= LW_META;
	}
	if (b && op != UBLK_IO_OP_FLUSH) {
		/* a write's block meets the lock once, at its end (charge looks at error there) */
		io->lw = b;
		return;
	}
	pthread_mutex_lock(&lw->lock);
	if (!b) {
		lw_stop_logging(lw, ENOMEM);
	} else if (lw->error) {
		free(b);
		b = NULL;
	} else {
		b->sector = b->nr_sectors = 0;
		b->cap_head = lw->held.head;
		b->cap_tail = lw->held.tail;
		lw->held.head = lw->held.tail = NULL;
	}
	pthread_mutex_unlock(&lw->lock);
	io->lw = b;
}

/* the result goes back: log what reached the store (a torn write's kept part even if it failed) */
static void lw_end(struct us_lwlog *lw, struct us_io *io, int result)
{
	struct lw_block *b = io->lw;

	if (!b)
		return;
	io->lw = NULL;
	if (b->flags & LW_FLUSH) {
		pthread_mutex_lock(&lw->lock);
		if (lw->error) {
			lw_free_chain(lw, b);
		} else if (result < 0) {
			/* nothing was made durable: the captured writes wait for the next FLUSH */
			struct lw_list cap = { b->cap_head, b->cap_tail };

			lw_list_splice(&cap, &lw->held);
			lw->held = cap;
			b->cap_head = b->cap_tail = NULL;
			lw_free_chain(lw, b);
		} else {
			list_add(&lw->ready, b);
			pthread_cond_signal(&lw->work);
		}
		pthread_mutex_unlock(&lw->lock);
		return;
	}
	if (result < 0 && (io->fault & 0xff) != US_FA_TORN) {
		free(b);	/* never charged: it holds no captured writes */
		return;
	}
	pthread_mutex_lock(&lw->lock);
	if (charge(lw, b)) {
		free(b);
	} else if (b->flags & LW_FUA) {
		list_add(&lw->ready, b);
		pthread_cond_signal(&lw->work);
	} else {
		list_add(&lw->held, b);
	}
	pthread_mutex_unlock(&lw->lock);
}

void us_lw_begin(struct us_queue *q, struct us_io *io)
{
	lw_begin(q->dev->cfg.logw, io);
}

void us_lw_end(struct us_queue *q, struct us_io *io, int result)
{
	lw_end(q->dev->cfg.logw, io, result);
}

void lw_deadline(struct timespec *until, int timeout_ms)
{
	clock_gettime(CLOCK_REALTIME, until);
	until->tv_sec += timeout_ms / 1000;
	until->tv_nsec += (long)(timeout_ms % 1000) * 1000000;
	if (until->tv_nsec >= 1000000000) {
		until->tv_sec++;
		until->tv_nsec -= 1000000000;
	}
}

int us_lw_mark_add(struct us_lwlog *lw, const char *name, uint64_t *ticket)
{
	size_t len = strlen(name);
	struct lw_block *b;
	int r = 0;

	/* the name shares the header sector with the entry, and readers want a NUL after it */
	if (!len || len > lw->sectorsize - sizeof(struct lw_entry) - 1)
		return -EINVAL;
	b = calloc(1, sizeof(*b) + len);
	if (!b)
		return -ENOMEM;
	memcpy(b->data, name, len);
	b->data_len = len;
	b->flags = LW_MARK;
	pthread_mutex_lock(&lw->lock);
	if (lw->error) {
		r = -lw->error;
		free(b);
	} else {
		b->seq = *ticket = ++lw->mark_seq;
		list_add(&lw->ready, b);
		lw->marks++;
		pthread_cond_signal(&lw->work);
	}
	pthread_mutex_unlock(&lw->lock);
	return r;
}

/* under lock */
static int mark_state_locked(struct us_lwlog *lw, uint64_t ticket, uint64_t *index)
{
	if (lw->mark_done >= ticket) {
		/* marks are written in ticket order; only the last one's entry is remembered */
		if (index)
			*index = lw->mark_done == ticket ? lw->last_mark : UINT64_MAX;
		return 1;
	}
	return lw->error ? -lw->error : 0;
}

int us_lw_mark_state(struct us_lwlog *lw, uint64_t ticket, uint64_t *index)
{
	int r;

	pthread_mutex_lock(&lw->lock);
	r = mark_state_locked(lw, ticket, index);
	pthread_mutex_unlock(&lw->lock);
	return r;
}

int us_lw_mark(struct us_lwlog *lw, const char *name, int timeout_ms, uint64_t *index)
{
	struct timespec until;
	uint64_t ticket;
	int r = us_lw_mark_add(lw, name, &ticket);

	if (r)
		return r;
	lw_deadline(&until, timeout_ms);
	pthread_mutex_lock(&lw->lock);
	while (!(r = mark_state_locked(lw, ticket, index)))
		if (pthread_cond_timedwait(&lw->idle, &lw->lock, &until) == ETIMEDOUT) {
			r = -ETIMEDOUT;
			break;
		}
	pthread_mutex_unlock(&lw->lock);
	return r < 0 ? r : 0;
}

void us_lw_status(struct us_lwlog *lw, struct us_lw_status *st)
{
	pthread_mutex_lock(&lw->lock);
	st->entries = lw->counted;
	st->log_bytes = lw->next_off;
	st->held_bytes = lw->bytes;
	st->held_max = lw->held_max;
	st->marks = lw->marks;
	st->error = lw->error;
	pthread_mutex_unlock(&lw->lock);
}

/* ---- tests: drive the log without a device --------------------------------- */

void *us_lw_test_begin(struct us_lwlog *lw, uint32_t op_flags, uint64_t sector, uint32_t nr_sectors,
		       const char *data)
{
	struct us_io *io = calloc(1, sizeof(*io) + ((size_t)nr_sectors << 9));

	if (!io)
		return NULL;
	io->op_flags = op_flags;
	io->start_sector = sector;
	io->nr_sectors = nr_sectors;
	io->buf = (char *)(io + 1);
	if (data)
		memcpy(io->buf, data, (size_t)nr_sectors << 9);
	lw_begin(lw, io);
	return io;
}

void us_lw_test_end(struct us_lwlog *lw, void *io, int result)
{
	lw_end(lw, io, result);
	free(io);
}
