/* SPDX-License-Identifier: MIT */
/*
 * The --log-writes log inside the native code: logwrites.c takes IO from the
 * queue threads, logwrites_file.c is the writer thread and the on-disk format.
 */
#ifndef USHELL_LOGWRITES_INT_H
#define USHELL_LOGWRITES_INT_H

#include <pthread.h>
#include <stdint.h>
#include <stddef.h>

#define LW_MAGIC	0x6a736677736872ULL
#define LW_VERSION	1ULL
#define LW_FLUSH	1
#define LW_FUA		2
#define LW_DISCARD	4
#define LW_MARK		8
#define LW_META		16	/* REQ_META: the file system's metadata */

struct lw_entry {		/* on disk, little endian (as the hosts we build for) */
	uint64_t	sector;
	uint64_t	nr_sectors;
	uint64_t	flags;
	uint64_t	data_len;
};

struct lw_super {
	uint64_t	magic;
	uint64_t	version;
	uint64_t	nr_entries;
	uint32_t	sectorsize;
} __attribute__((packed));

struct lw_block {
	struct lw_block	*next;
	/* a FLUSH: the held writes it captured when it was sent */
	struct lw_block	*cap_head, *cap_tail;
	uint64_t	sector, nr_sectors, flags;	/* sectors of sectorsize */
	uint64_t	data_len;
	uint64_t	seq;		/* a mark's ticket (us_lw_mark_add) */
	uint8_t		zeroes;		/* WRITE_ZEROES: data_len zero bytes, none stored */
	uint8_t		charged;	/* counted in bytes (held against the memory bound) */
	char		data[];
};

struct lw_list {
	struct lw_block	*head, *tail;
};

struct us_lwlog {
	pthread_mutex_t	lock;
	pthread_cond_t	work, idle;
	struct lw_list	held, ready;
	uint64_t	bytes;		/* charged blocks: held, ready, captured, being written */
	uint64_t	limit;
	int		fd;
	uint32_t	sectorsize;
	unsigned	shift;		/* sectorsize = 512 << shift */
	/* the writer's, changed under lock so that status and marks read them whole */
	uint64_t	next_off;	/* where the next entry goes */
	uint64_t	entries;	/* entries written */
	uint64_t	counted;	/* entries the super block counts */
	uint64_t	held_max;
	uint32_t	marks;
	uint64_t	mark_seq;	/* tickets handed out */
	uint64_t	mark_done;	/* the ticket of the last mark written */
	uint64_t	last_mark;	/* its entry number */
	int		error;		/* positive errno once logging stopped */
	int		busy;		/* the writer holds blocks off the ready list */
	int		stop;
	int		abandon;	/* close gave up waiting: the writer drops what is left */
	pthread_t	thr;
	char		*zero;		/* sectorsize zeroes, and a WRITE_ZEROES's data */
	size_t		zero_len;
};

/* logwrites.c, under lw->lock: end logging for good; what is not yet written is dropped */
void lw_stop_logging(struct us_lwlog *lw, int err);
/* under lw->lock: free a chain (and what its FLUSHes captured), uncharging its data */
void lw_free_chain(struct us_lwlog *lw, struct lw_block *b);
/* logwrites.c: move all of from behind to */
void lw_list_splice(struct lw_list *to, struct lw_list *from);
/* logwrites.c: a CLOCK_REALTIME deadline timeout_ms from now, for pthread_cond_timedwait */
struct timespec;
void lw_deadline(struct timespec *until, int timeout_ms);
/* logwrites_file.c: the super block counting n entries */
int lw_write_super(struct us_lwlog *lw, uint64_t n);
void *lw_writer(void *arg);

#endif
