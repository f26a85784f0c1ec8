/* SPDX-License-Identifier: MIT */
/*
 * Writing (queue threads) and reading (Python, through cffi) the device's
 * shared memory described in records.h.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "ushell.h"

/* relaxed single-writer updates: readers only need each word untorn */
#define WR(p, v)	__atomic_store_n(&(p), (v), __ATOMIC_RELAXED)
#define RD(p)		__atomic_load_n(&(p), __ATOMIC_RELAXED)

static inline uint64_t round8(uint64_t n) { return (n + 63) & ~63ULL; }

static uint64_t queue_stride(uint32_t depth, uint32_t rec_entries)
{
	return round8(sizeof(struct us_shm_queue) + depth * sizeof(struct us_tag_state)) +
		(uint64_t)rec_entries * sizeof(struct us_rec);
}

static uint64_t tags_off(void)
{
	return sizeof(struct us_shm_queue);
}

static uint64_t recs_off(uint32_t depth)
{
	return round8(sizeof(struct us_shm_queue) + depth * sizeof(struct us_tag_state));
}

static uint64_t fault_off(uint32_t nr_queues, uint32_t depth, uint32_t rec_entries)
{
	return round8(sizeof(struct us_shm_hdr)) + nr_queues * queue_stride(depth, rec_entries);
}

/*
 * The only geometries a file may have. Inside these bounds the largest layout
 * is about 4.4e12 bytes, so none of the offset arithmetic can overflow 64 bits,
 * and a file that claims anything else is refused before any offset is formed.
 */
static int geometry_ok(uint64_t nr_queues, uint64_t depth, uint64_t rec_entries)
{
	return nr_queues >= 1 && nr_queues <= UBLK_MAX_NR_QUEUES &&
		depth >= 1 && depth <= UBLK_MAX_QUEUE_DEPTH &&
		rec_entries >= US_REC_MIN && rec_entries <= US_REC_MAX &&
		!(rec_entries & (rec_entries - 1));
}

uint64_t us_shm_size(uint32_t nr_queues, uint32_t depth, uint32_t rec_entries)
{
	if (!geometry_ok(nr_queues, depth, rec_entries))
		return 0;
	return fault_off(nr_queues, depth, rec_entries) + round8(sizeof(struct us_fault_area));
}

int us_shm_fault_off_ok(const struct us_shm_hdr *h)
{
	/* each field read once: the arithmetic must use the values that were bounded */
	uint32_t nr_queues = RD(h->nr_queues), depth = RD(h->depth), rec_entries = RD(h->rec_entries);

	return geometry_ok(nr_queues, depth, rec_entries) &&
		RD(h->fault_off) == fault_off(nr_queues, depth, rec_entries);
}

/* first failed test wins: the user hears about one field, the one to look at */
#define BAD(field, fmt, ...) do {						\
		if (bad)							\
			snprintf(bad->why, sizeof(bad->why), field " " fmt, __VA_ARGS__); \
		return -EBADMSG;						\
	} while (0)

int us_shm_check(const void *base, uint64_t len, struct us_shm_bad *bad)
{
	struct us_shm_hdr copy, *h = &copy;
	uint64_t want;

	if (bad)
		bad->why[0] = 0;
	if (!base || len < sizeof(*h))
		BAD("file size", "%llu, expected at least %zu", (unsigned long long)len, sizeof(*h));
	/* the magic is published last (us_shm_init); the rest is judged as one private copy,
	 * so a field rewritten meanwhile cannot pass one test and then feed another unchecked */
	copy.magic = __atomic_load_n(&((const struct us_shm_hdr *)base)->magic, __ATOMIC_ACQUIRE);
	if (h->magic != US_SHM_MAGIC)
		BAD("magic", "0x%llx, expected 0x%llx", (unsigned long long)h->magic, US_SHM_MAGIC);
	memcpy((char *)&copy + sizeof(copy.magic), (const char *)base + sizeof(copy.magic),
	       sizeof(copy) - sizeof(copy.magic));
	if (h->version != US_SHM_VERSION)
		BAD("version", "%u, expected %u", h->version, US_SHM_VERSION);
	if (h->hdr_size != sizeof(*h))
		BAD("hdr_size", "%u, expected %zu", h->hdr_size, sizeof(*h));
	if (h->hist_buckets != US_HIST_BUCKETS)
		BAD("hist_buckets", "%u, expected %u", h->hist_buckets, US_HIST_BUCKETS);
	if (h->nr_queues < 1 || h->nr_queues > UBLK_MAX_NR_QUEUES)
		BAD("nr_queues", "%u, expected 1..%u", h->nr_queues, UBLK_MAX_NR_QUEUES);
	if (h->depth < 1 || h->depth > UBLK_MAX_QUEUE_DEPTH)
		BAD("depth", "%u, expected 1..%u", h->depth, UBLK_MAX_QUEUE_DEPTH);
	if (!geometry_ok(h->nr_queues, h->depth, h->rec_entries))
		BAD("rec_entries", "%u, expected a power of two in %u..%u", h->rec_entries,
		    US_REC_MIN, US_REC_MAX);
	/* the geometry is sane: from here on every expected value fits in 64 bits */
	want = round8(sizeof(*h));
	if (h->queue_off != want)
		BAD("queue_off", "%llu, expected %llu", (unsigned long long)h->queue_off,
		    (unsigned long long)want);
	want = queue_stride(h->depth, h->rec_entries);
	if (h->queue_stride != want)
		BAD("queue_stride", "%llu, expected %llu", (unsigned long long)h->queue_stride,
		    (unsigned long long)want);
	want = fault_off(h->nr_queues, h->depth, h->rec_entries);
	if (h->fault_off != want)
		BAD("fault_off", "%llu, expected %llu", (unsigned long long)h->fault_off,
		    (unsigned long long)want);
	want = us_shm_size(h->nr_queues, h->depth, h->rec_entries);
	if (len < want)
		BAD("file size", "%llu, expected at least %llu", (unsigned long long)len,
		    (unsigned long long)want);
	return 0;
}
#undef BAD

uint64_t us_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

int us_shm_init(void *base, uint64_t len, uint32_t nr_queues, uint32_t depth,
		uint32_t rec_entries, uint32_t dev_id, int32_t pid)
{
	struct us_shm_hdr *h = base;
	struct timespec rt;

	/* never publish a file that us_shm_check would refuse */
	if (!us_shm_size(nr_queues, depth, rec_entries))
		return -EINVAL;
	if (len < us_shm_size(nr_queues, depth, rec_entries))
		return -ENOSPC;
	memset(base, 0, us_shm_size(nr_queues, depth, rec_entries));
	h->version = US_SHM_VERSION;
	h->hdr_size = sizeof(*h);
	h->nr_queues = nr_queues;
	h->depth = depth;
	h->rec_entries = rec_entries;
	h->hist_buckets = US_HIST_BUCKETS;
	h->queue_off = round8(sizeof(*h));
	h->queue_stride = queue_stride(depth, rec_entries);
	h->daemon_pid = pid;
	h->dev_id = dev_id;
	h->created_mono_ns = us_now_ns();
	clock_gettime(CLOCK_REALTIME, &rt);
	h->created_real_ns = (uint64_t)rt.tv_sec * 1000000000ULL + rt.tv_nsec;
	h->fault_off = fault_off(nr_queues, depth, rec_entries);
	us_fault_area_init((struct us_fault_area *)((char *)base + h->fault_off));
	/* readers check the magic last */
	__atomic_store_n(&h->magic, US_SHM_MAGIC, __ATOMIC_RELEASE);
	return 0;
}

struct us_shm_queue *us_shm_queue(void *base, int q_id)
{
	struct us_shm_hdr *h = base;

	if (!base || q_id < 0 || (uint32_t)q_id >= h->nr_queues)
		return NULL;
	return (struct us_shm_queue *)((char *)base + h->queue_off + q_id * h->queue_stride);
}

struct us_tag_state *us_shm_tags(void *base, int q_id)
{
	struct us_shm_queue *sq = us_shm_queue(base, q_id);

	return sq ? (struct us_tag_state *)((char *)sq + tags_off()) : NULL;
}

static struct us_rec *shm_recs(void *base, struct us_shm_queue *sq)
{
	return (struct us_rec *)((char *)sq + recs_off(((struct us_shm_hdr *)base)->depth));
}

int us_hist_bucket(uint64_t v)
{
	int e, idx;

	if (v < (1u << US_HIST_SUB_BITS))
		return (int)v;
	e = 63 - __builtin_clzll(v);
	idx = (e - US_HIST_SUB_BITS + 1) * (1 << US_HIST_SUB_BITS) +
		(int)((v >> (e - US_HIST_SUB_BITS)) & ((1 << US_HIST_SUB_BITS) - 1));
	return idx < US_HIST_BUCKETS ? idx : US_HIST_BUCKETS - 1;
}

uint64_t us_hist_low(int idx)
{
	int e, m;

	if (idx < (1 << US_HIST_SUB_BITS))
		return idx;
	e = idx / (1 << US_HIST_SUB_BITS) + US_HIST_SUB_BITS - 1;
	m = idx % (1 << US_HIST_SUB_BITS);
	return ((uint64_t)((1 << US_HIST_SUB_BITS) + m)) << (e - US_HIST_SUB_BITS);
}

void us_rec_begin(struct us_queue *q, unsigned tag, struct us_io *io)
{
	struct us_tag_state *t;

	if (!q->shmq)
		return;
	io->t_start_ns = us_now_ns();
	t = &q->shm_tags[tag];
	WR(t->t_start_ns, io->t_start_ns);
	WR(t->start_sector, io->start_sector);
	WR(t->op_flags, io->op_flags);
	WR(t->nr_sectors, io->nr_sectors);
	WR(t->fault, 0);
	WR(t->state, 1);
	WR(q->shmq->inflight, RD(q->shmq->inflight) + 1);
}

static inline void rec_end_at(struct us_queue *q, unsigned tag, struct us_io *io, int result,
			      uint64_t now)
{
	struct us_shm_queue *sq = q->shmq;
	struct us_op_stats *os;
	struct us_rec *r;
	uint64_t lat, seq;
	int b;

	if (!sq)
		return;
	lat = now - io->t_start_ns;
	os = &sq->ops[us_op_index(io->op_flags)];
	WR(os->ios, RD(os->ios) + 1);
	if (result < 0)
		WR(os->errors, RD(os->errors) + 1);
	else if ((io->op_flags & 0xff) <= UBLK_IO_OP_WRITE)
		WR(os->bytes, RD(os->bytes) + (uint64_t)result);
	WR(os->lat_sum_ns, RD(os->lat_sum_ns) + lat);
	if (lat > RD(os->lat_max_ns))
		WR(os->lat_max_ns, lat);
	b = us_hist_bucket(lat);
	WR(os->hist[b], RD(os->hist[b]) + 1);

	seq = RD(sq->rec_head);
	r = &q->shm_recs[seq & (q->rec_entries - 1)];
	/* invalidate first: a reader that sees seq unchanged across its copy got a whole record */
	__atomic_store_n(&r->seq, 0, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_RELEASE);
	r->t_start_ns = io->t_start_ns;
	r->lat_ns = lat;
	r->start_sector = io->start_sector;
	r->nr_sectors = io->nr_sectors;
	r->op_flags = io->op_flags;
	r->result = result;
	r->tag = tag;
	r->q_id = q->q_id;
	r->fault = io->fault;
	__atomic_store_n(&r->seq, seq + 1, __ATOMIC_RELEASE);
	__atomic_store_n(&sq->rec_head, seq + 1, __ATOMIC_RELEASE);

	WR(q->shm_tags[tag].state, 0);
	WR(sq->inflight, RD(sq->inflight) - 1);
}

void us_rec_end(struct us_queue *q, unsigned tag, struct us_io *io, int result)
{
	if (q->shmq)
		rec_end_at(q, tag, io, result, us_now_ns());
}

uint64_t us_rec_head(void *base, int q_id)
{
	struct us_shm_queue *sq = us_shm_queue(base, q_id);

	return sq ? __atomic_load_n(&sq->rec_head, __ATOMIC_ACQUIRE) : 0;
}

int us_rec_read(void *base, int q_id, uint64_t seq, struct us_rec *out)
{
	struct us_shm_hdr *h = base;
	struct us_shm_queue *sq = us_shm_queue(base, q_id);
	struct us_rec *r;
	uint64_t s1, s2;

	if (!sq)
		return -EINVAL;
	if (seq >= __atomic_load_n(&sq->rec_head, __ATOMIC_ACQUIRE))
		return 0;
	r = &shm_recs(base, sq)[seq & (h->rec_entries - 1)];
	s1 = __atomic_load_n(&r->seq, __ATOMIC_ACQUIRE);
	memcpy(out, r, sizeof(*out));
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	s2 = __atomic_load_n(&r->seq, __ATOMIC_RELAXED);
	/* published records only change when the writer laps the reader */
	return s1 == seq + 1 && s2 == s1 ? 1 : -1;
}

/*
 * The batch reader trusts none of the header's words it finds now: a file
 * rewritten since us_shm_check passed it could name a larger geometry than
 * was mapped. The geometry is read once, bounded, and must fit in len (the
 * checked mapping), and the queue and its ring are located from it alone.
 */
int us_rec_read_batch(const void *base, uint64_t len, int q_id, uint64_t *cursor,
		      struct us_rec *out, int max, uint64_t *lost)
{
	const struct us_shm_hdr *h = base;
	const struct us_shm_queue *sq;
	const struct us_rec *recs, *r;
	uint32_t nr_queues, depth, entries;
	uint64_t head, seq, s1, s2;
	int n = 0;

	if (!base || len < sizeof(*h) || !cursor || !lost || max < 0 || (max && !out))
		return -EINVAL;
	nr_queues = RD(h->nr_queues);
	depth = RD(h->depth);
	entries = RD(h->rec_entries);
	if (!geometry_ok(nr_queues, depth, entries) || q_id < 0 || (uint32_t)q_id >= nr_queues ||
	    us_shm_size(nr_queues, depth, entries) > len)
		return -EINVAL;
	sq = (const struct us_shm_queue *)((const char *)base + round8(sizeof(*h)) +
					   (uint64_t)q_id * queue_stride(depth, entries));
	recs = (const struct us_rec *)((const char *)sq + recs_off(depth));
	head = __atomic_load_n(&sq->rec_head, __ATOMIC_ACQUIRE);
	seq = *cursor;
	/* a head behind the cursor (a file laid out again) has nothing new for it */
	if (head <= seq)
		return 0;
	if (head - seq > entries) {
		/* lapped: what the writer overwrote is gone, never waited for */
		*lost += head - entries - seq;
		seq = head - entries;
	}
	for (; seq < head && n < max; seq++) {
		r = &recs[seq & (entries - 1)];
		s1 = __atomic_load_n(&r->seq, __ATOMIC_ACQUIRE);
		memcpy(&out[n], r, sizeof(*out));
		__atomic_thread_fence(__ATOMIC_ACQUIRE);
		s2 = __atomic_load_n(&r->seq, __ATOMIC_RELAXED);
		/* as us_rec_read: unchanged across the copy, and the record this cursor wants */
		if (s1 == seq + 1 && s2 == s1)
			n++;
		else
			(*lost)++;
	}
	*cursor = seq;
	return n;
}

void us_shm_attach(struct us_queue *q, void *base)
{
	struct us_shm_hdr *h = base;

	q->shmq = us_shm_queue(base, q->q_id);
	if (!q->shmq)
		return;
	q->shm_tags = us_shm_tags(base, q->q_id);
	q->shm_recs = shm_recs(base, q->shmq);
	q->rec_entries = h->rec_entries;
}

/*
 * Record one IO through the same code the queue threads run, without a
 * device: for tests of the ring, counters and histograms on any kernel.
 */
int us_shm_record_io(void *base, int q_id, unsigned tag, uint32_t op_flags, uint64_t sector,
		     uint32_t nr_sectors, int32_t result, uint64_t lat_ns)
{
	struct us_queue q;
	struct us_io io;

	memset(&q, 0, sizeof(q));
	memset(&io, 0, sizeof(io));
	q.q_id = q_id;
	us_shm_attach(&q, base);
	if (!q.shmq || tag >= ((struct us_shm_hdr *)base)->depth)
		return -EINVAL;
	io.op_flags = op_flags;
	io.start_sector = sector;
	io.nr_sectors = nr_sectors;
	us_rec_begin(&q, tag, &io);
	/* exactly lat_ns, however long this thread was held up between the two calls */
	rec_end_at(&q, tag, &io, result, io.t_start_ns + lat_ns);
	return 0;
}
