/* SPDX-License-Identifier: MIT */
/*
 * The zone state machine of a zoned mem device (`add -t mem --zoned`): a
 * host-managed drive as Linux's null_blk zoned mode models one (ZBC/ZNS):
 *
 *   conventional zones first (no write pointer, written anywhere), then
 *   sequential-write-required zones: EMPTY -> IMP_OPEN (a write) or EXP_OPEN
 *   (ZONE_OPEN) -> CLOSED (ZONE_CLOSE with data) -> FULL (written to the end
 *   or ZONE_FINISH) -> EMPTY (ZONE_RESET, RESET_ALL).
 *
 * A write must start at the zone's write pointer and stay inside the zone,
 * else EIO, as a real drive fails it; a ZONE_APPEND lands at the pointer and
 * says where. max_open counts open zones (implicitly opened ones are closed
 * to make room, as null_blk does), max_active counts open and closed ones:
 * running out is ETOOMANYREFS and EOVERFLOW, which the block layer turns into
 * BLK_STS_ZONE_OPEN_RESOURCE and BLK_STS_ZONE_ACTIVE_RESOURCE. Reads past a
 * write pointer are zeros.
 *
 * Where the state lives: in its own small file beside the data (DATA/NAME.zones
 * on the same tmpfs), mapped shared. Like the data it outlives a killed daemon,
 * so a recovered one serves the same write pointers and conditions. Deriving
 * the pointers from the data instead cannot work: zeros written look like a
 * hole, and an explicitly opened, closed or finished zone holds no trace of
 * its condition in its data. The counts of open and active zones are derived
 * from the conditions at open, so only the file is the truth.
 *
 * One mutex per device guards the state; a write to a sequential zone holds
 * it across its copy into the data file, so that the pointer never runs ahead
 * of data another queue could read. The copy is a memcpy into tmpfs; a write
 * to a conventional zone and every read take no lock.
 *
 * Longer than 400 lines: it is one state machine (its file, its transitions,
 * its resource counts and the requests that drive them), which reads best
 * whole; a split would put halves of each transition in two files.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <linux/blkzoned.h>

#include "ushell.h"

#define ZONES_MAGIC	0x53454e4f5a4b4c55ULL	/* "ULKZONES" */
#define ZONES_VERSION	1

/* the file: this header, then one record per zone */
struct zones_hdr {
	uint64_t	magic;
	uint32_t	version;
	uint32_t	nr_zones;
	uint64_t	zone_sectors;
	uint32_t	nr_conv;
	uint32_t	pad;
};

struct zone_rec {
	uint64_t	wp;		/* absolute sector */
	uint8_t		cond;		/* BLK_ZONE_COND_* */
	uint8_t		pad[7];
};

struct us_zones {
	pthread_mutex_t	lock;
	struct zones_hdr *hdr;
	struct zone_rec	*z;
	size_t		map_len;
	int		data_fd;
	uint64_t	zone_sectors;
	unsigned	shift;		/* log2(zone_sectors) */
	uint32_t	nr_zones, nr_conv;
	uint32_t	max_open, max_active;	/* 0: no limit */
	uint32_t	nr_open, nr_active;	/* under lock */
};

uint64_t us_zones_file_size(uint32_t nr_zones)
{
	return sizeof(struct zones_hdr) + (uint64_t)nr_zones * sizeof(struct zone_rec);
}

static int is_seq(const struct us_zones *zs, uint32_t i)
{
	return i >= zs->nr_conv;
}

static uint64_t zstart(const struct us_zones *zs, uint32_t i)
{
	return (uint64_t)i << zs->shift;
}

static uint64_t zend(const struct us_zones *zs, uint32_t i)
{
	return zstart(zs, i) + zs->zone_sectors;
}

/* conditions that hold a zone's resources */
static int is_open(uint8_t c)
{
	return c == BLK_ZONE_COND_IMP_OPEN || c == BLK_ZONE_COND_EXP_OPEN;
}

static int is_active(uint8_t c)
{
	return is_open(c) || c == BLK_ZONE_COND_CLOSED;
}

/* a fresh file: every zone empty (conventional ones have no pointer) */
static void format(struct us_zones *zs)
{
	uint32_t i;

	for (i = 0; i < zs->nr_zones; i++) {
		zs->z[i].wp = is_seq(zs, i) ? zstart(zs, i) : zend(zs, i);
		zs->z[i].cond = is_seq(zs, i) ? BLK_ZONE_COND_EMPTY : BLK_ZONE_COND_NOT_WP;
	}
	zs->hdr->nr_zones = zs->nr_zones;
	zs->hdr->zone_sectors = zs->zone_sectors;
	zs->hdr->nr_conv = zs->nr_conv;
	zs->hdr->version = ZONES_VERSION;
	/* the magic last: a daemon killed before this point left a file that formats again */
	__atomic_store_n(&zs->hdr->magic, ZONES_MAGIC, __ATOMIC_RELEASE);
}

/*
 * A file another daemon wrote is input: its geometry must be ours and every
 * record a state this machine can reach, or the device is not served.
 */
static int adopt(struct us_zones *zs)
{
	const struct zones_hdr *h = zs->hdr;
	uint32_t i;

	if (h->version != ZONES_VERSION || h->nr_zones != zs->nr_zones ||
	    h->zone_sectors != zs->zone_sectors || h->nr_conv != zs->nr_conv)
		return -EINVAL;
	for (i = 0; i < zs->nr_zones; i++) {
		struct zone_rec *r = &zs->z[i];

		if (!is_seq(zs, i)) {
			if (r->cond != BLK_ZONE_COND_NOT_WP)
				return -EINVAL;
			continue;
		}
		if (r->wp < zstart(zs, i) || r->wp > zend(zs, i))
			return -EINVAL;
		switch (r->cond) {
		case BLK_ZONE_COND_EMPTY:
		case BLK_ZONE_COND_IMP_OPEN:
		case BLK_ZONE_COND_EXP_OPEN:
		case BLK_ZONE_COND_CLOSED:
		case BLK_ZONE_COND_FULL:
			break;
		default:
			return -EINVAL;
		}
		/* a daemon killed between the two stores of a transition: the pointer is the truth */
		if (r->cond == BLK_ZONE_COND_EMPTY && r->wp != zstart(zs, i))
			r->cond = BLK_ZONE_COND_CLOSED;
		if (r->cond == BLK_ZONE_COND_FULL)
			r->wp = zend(zs, i);
		if (is_open(r->cond))
			zs->nr_open++;
		if (is_active(r->cond))
			zs->nr_active++;
	}
	return 0;
}

struct us_zones *us_zones_open(int state_fd, int data_fd, uint64_t dev_sectors, uint64_t zone_sectors,
			       uint32_t nr_conv, uint32_t max_open, uint32_t max_active, int *err)
{
	struct us_zones *zs;
	struct stat st;
	uint64_t nr;
	void *m;

	*err = -EINVAL;
	/* the CLI checked all of this (validate.py); the C side does not trust it either */
	if (!zone_sectors || zone_sectors & (zone_sectors - 1) || dev_sectors % zone_sectors)
		return NULL;
	nr = dev_sectors / zone_sectors;
	if (!nr || nr > US_ZONES_MAX || nr_conv >= nr || max_open > nr || max_active > nr ||
	    (max_active && max_open > max_active))
		return NULL;
	if (fstat(state_fd, &st) < 0) {
		*err = -errno;
		return NULL;
	}
	if ((uint64_t)st.st_size != us_zones_file_size((uint32_t)nr))
		return NULL;
	zs = calloc(1, sizeof(*zs));
	if (!zs) {
		*err = -ENOMEM;
		return NULL;
	}
	zs->map_len = us_zones_file_size((uint32_t)nr);
	m = mmap(NULL, zs->map_len, PROT_READ | PROT_WRITE, MAP_SHARED, state_fd, 0);
	if (m == MAP_FAILED) {
		*err = -errno;
		free(zs);
		return NULL;
	}
	zs->hdr = m;
	zs->z = (struct zone_rec *)((char *)m + sizeof(struct zones_hdr));
	zs->data_fd = data_fd;
	zs->zone_sectors = zone_sectors;
	zs->shift = (unsigned)__builtin_ctzll(zone_sectors);
	zs->nr_zones = (uint32_t)nr;
	zs->nr_conv = nr_conv;
	zs->max_open = max_open;
	zs->max_active = max_active;
	if (__atomic_load_n(&zs->hdr->magic, __ATOMIC_ACQUIRE) != ZONES_MAGIC)
		format(zs);
	else if ((*err = adopt(zs)) != 0) {
		munmap(m, zs->map_len);
		free(zs);
		return NULL;
	}
	pthread_mutex_init(&zs->lock, NULL);
	*err = 0;
	return zs;
}

void us_zones_close(struct us_zones *zs)
{
	if (!zs)
		return;
	pthread_mutex_destroy(&zs->lock);
	munmap(zs->hdr, zs->map_len);
	free(zs);
}

/*
 * Room to open one more zone: at the limit, close an implicitly open one
 * (the drive may; an explicitly opened zone stays open). Under lock.
 */
static int make_open_room(struct us_zones *zs)
{
	uint32_t i;

	if (!zs->max_open || zs->nr_open < zs->max_open)
		return 0;
	for (i = zs->nr_conv; i < zs->nr_zones; i++) {
		struct zone_rec *r = &zs->z[i];

		if (r->cond == BLK_ZONE_COND_IMP_OPEN) {
			r->cond = r->wp == zstart(zs, i) ? BLK_ZONE_COND_EMPTY : BLK_ZONE_COND_CLOSED;
			zs->nr_open--;
			if (r->cond == BLK_ZONE_COND_EMPTY)
				zs->nr_active--;
			return 0;
		}
	}
	return -ETOOMANYREFS;
}

/* the resources zone i needs to open (EMPTY needs an active slot too); under lock */
static int can_open(struct us_zones *zs, uint32_t i)
{
	uint8_t c = zs->z[i].cond;

	if (c == BLK_ZONE_COND_EMPTY && zs->max_active && zs->nr_active >= zs->max_active)
		return -EOVERFLOW;
	if (c == BLK_ZONE_COND_EMPTY || c == BLK_ZONE_COND_CLOSED)
		return make_open_room(zs);
	return 0;
}

static void set_open(struct us_zones *zs, uint32_t i, uint8_t cond)
{
	struct zone_rec *r = &zs->z[i];

	if (r->cond == BLK_ZONE_COND_EMPTY)
		zs->nr_active++;
	if (!is_open(r->cond))
		zs->nr_open++;
	r->cond = cond;
}

/* give back what zone i holds: it is about to be EMPTY or FULL */
static void release(struct us_zones *zs, uint32_t i)
{
	uint8_t c = zs->z[i].cond;

	if (is_open(c))
		zs->nr_open--;
	if (is_active(c))
		zs->nr_active--;
}

static int zone_write(struct us_zones *zs, uint32_t i, uint64_t sector, uint32_t nr,
		      const char *buf, int append, uint64_t *lba)
{
	struct zone_rec *r = &zs->z[i];
	size_t len = (size_t)nr << 9;
	int ret;

	if (!is_seq(zs, i)) {
		/* a conventional zone takes writes anywhere, but has no pointer to append at */
		if (append)
			return -EIO;
		ret = us_pwrite_full(zs->data_fd, buf, len, (off_t)sector << 9);
		return ret ? ret : (int)len;
	}
	pthread_mutex_lock(&zs->lock);
	ret = -EIO;
	if (r->cond == BLK_ZONE_COND_FULL)
		goto out;
	if (append)
		sector = r->wp;
	/* not at the pointer: the unaligned write a host-managed drive refuses */
	else if (sector != r->wp)
		goto out;
	if (sector + nr > zend(zs, i))
		goto out;
	ret = can_open(zs, i);
	if (ret)
		goto out;
	ret = us_pwrite_full(zs->data_fd, buf, len, (off_t)sector << 9);
	if (ret)
		goto out;
	if (!is_open(r->cond))
		set_open(zs, i, BLK_ZONE_COND_IMP_OPEN);
	r->wp = sector + nr;
	if (r->wp == zend(zs, i)) {
		release(zs, i);
		r->cond = BLK_ZONE_COND_FULL;
	}
	*lba = sector;
	ret = (int)len;
out:
	pthread_mutex_unlock(&zs->lock);
	return ret;
}

/* zeros from the write pointer on; conventional zones are read as they are */
static int zones_read(struct us_zones *zs, uint64_t sector, uint32_t nr, char *buf)
{
	uint64_t end = sector + nr, s = sector;
	int ret;

	while (s < end) {
		uint32_t i = (uint32_t)(s >> zs->shift);
		uint64_t seg_end = zend(zs, i) < end ? zend(zs, i) : end;
		uint64_t valid = seg_end;
		char *p = buf + ((s - sector) << 9);

		if (is_seq(zs, i)) {
			uint64_t wp = __atomic_load_n(&zs->z[i].wp, __ATOMIC_ACQUIRE);

			valid = wp < s ? s : wp < seg_end ? wp : seg_end;
		}
		if (valid > s) {
			ret = us_pread_zero(zs->data_fd, p, (valid - s) << 9, (off_t)s << 9);
			if (ret)
				return ret;
		}
		if (seg_end > valid)
			memset(p + ((valid - s) << 9), 0, (seg_end - valid) << 9);
		s = seg_end;
	}
	return (int)((size_t)nr << 9);
}

/* reset zone i: empty, and its data given back so that it reads as zeros; under lock */
static int reset_one(struct us_zones *zs, uint32_t i)
{
	struct zone_rec *r = &zs->z[i];

	if (r->cond == BLK_ZONE_COND_EMPTY)
		return 0;
	if (fallocate(zs->data_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
		      (off_t)zstart(zs, i) << 9, (off_t)zs->zone_sectors << 9) < 0)
		return -errno;
	release(zs, i);
	/* the condition first: a kill between the stores leaves EMPTY with a pointer, which adopt mends */
	r->cond = BLK_ZONE_COND_EMPTY;
	r->wp = zstart(zs, i);
	return 0;
}

static int zone_mgmt(struct us_zones *zs, unsigned op, uint32_t i)
{
	struct zone_rec *r = &zs->z[i];
	int ret = 0;

	/* a conventional zone has no state to change: the drive refuses (null_blk: IOERR) */
	if (!is_seq(zs, i))
		return -EIO;
	pthread_mutex_lock(&zs->lock);
	switch (op) {
	case UBLK_IO_OP_ZONE_OPEN:
		if (r->cond == BLK_ZONE_COND_EXP_OPEN)
			break;
		if (r->cond == BLK_ZONE_COND_FULL) {
			ret = -EIO;
			break;
		}
		ret = can_open(zs, i);
		if (!ret)
			set_open(zs, i, BLK_ZONE_COND_EXP_OPEN);
		break;
	case UBLK_IO_OP_ZONE_CLOSE:
		if (r->cond == BLK_ZONE_COND_CLOSED)
			break;
		if (!is_open(r->cond)) {
			ret = -EIO;
			break;
		}
		zs->nr_open--;
		if (r->wp == zstart(zs, i)) {
			zs->nr_active--;
			r->cond = BLK_ZONE_COND_EMPTY;
		} else {
			r->cond = BLK_ZONE_COND_CLOSED;
		}
		break;
	case UBLK_IO_OP_ZONE_FINISH:
		if (r->cond == BLK_ZONE_COND_FULL)
			break;
		/* an empty zone passes through active on its way to full */
		if (r->cond == BLK_ZONE_COND_EMPTY && zs->max_active && zs->nr_active >= zs->max_active) {
			ret = -EOVERFLOW;
			break;
		}
		release(zs, i);
		r->wp = zend(zs, i);
		r->cond = BLK_ZONE_COND_FULL;
		break;
	case UBLK_IO_OP_ZONE_RESET:
		ret = reset_one(zs, i);
		break;
	default:
		ret = -EOPNOTSUPP;
	}
	pthread_mutex_unlock(&zs->lock);
	return ret;
}

static int reset_all(struct us_zones *zs)
{
	uint32_t i;
	int ret = 0;

	pthread_mutex_lock(&zs->lock);
	for (i = zs->nr_conv; i < zs->nr_zones && !ret; i++)
		ret = reset_one(zs, i);
	pthread_mutex_unlock(&zs->lock);
	return ret;
}

/*
 * REPORT_ZONES: struct blk_zone entries from the zone holding sector on, as
 * many as asked and fit in len bytes; the rest of the buffer zeros (a zero
 * length ends the kernel's walk). The result is the bytes filled; the front
 * end answers the driver for the whole request (ublk_buffers.c).
 */
static int report(struct us_zones *zs, uint64_t sector, uint32_t nr_zones, char *buf, size_t len)
{
	struct blk_zone *bz = (struct blk_zone *)buf;
	size_t want = (size_t)nr_zones * sizeof(*bz);
	uint32_t i, n;

	if (want > len)
		want = len - len % sizeof(*bz);
	memset(buf, 0, want);
	if (!want)
		return 0;
	i = (uint32_t)(sector >> zs->shift);
	pthread_mutex_lock(&zs->lock);
	for (n = 0; n < want / sizeof(*bz) && i < zs->nr_zones; n++, i++) {
		bz[n].start = zstart(zs, i);
		bz[n].len = zs->zone_sectors;
		bz[n].capacity = zs->zone_sectors;
		bz[n].wp = zs->z[i].wp;
		bz[n].type = is_seq(zs, i) ? BLK_ZONE_TYPE_SEQWRITE_REQ : BLK_ZONE_TYPE_CONVENTIONAL;
		bz[n].cond = zs->z[i].cond;
	}
	pthread_mutex_unlock(&zs->lock);
	return (int)want;
}

int us_zones_io(struct us_zones *zs, uint32_t op_flags, uint64_t sector, uint32_t nr, char *buf,
		size_t buf_len, uint64_t *lba)
{
	unsigned op = op_flags & 0xff;
	uint64_t end = sector + nr, dev_sectors = (uint64_t)zs->nr_zones << zs->shift;
	uint32_t i = (uint32_t)(sector >> zs->shift);

	/* the kernel never sends these past the end; a bad request must not index past the table */
	if (sector >= dev_sectors && op != UBLK_IO_OP_ZONE_RESET_ALL && op != UBLK_IO_OP_FLUSH)
		return -EIO;
	switch (op) {
	case UBLK_IO_OP_READ:
		if (end > dev_sectors || ((size_t)nr << 9) > buf_len)
			return -EIO;
		return zones_read(zs, sector, nr, buf);
	case UBLK_IO_OP_WRITE:
	case UBLK_IO_OP_ZONE_APPEND:
		/* crossing into the next zone is as unaligned as missing the pointer */
		if (end > zend(zs, i) || ((size_t)nr << 9) > buf_len)
			return -EIO;
		/* an append names its zone's start */
		if (op == UBLK_IO_OP_ZONE_APPEND && sector != zstart(zs, i))
			return -EIO;
		return zone_write(zs, i, sector, nr, buf, op == UBLK_IO_OP_ZONE_APPEND, lba);
	case UBLK_IO_OP_FLUSH:
		return 0;
	case UBLK_IO_OP_ZONE_OPEN:
	case UBLK_IO_OP_ZONE_CLOSE:
	case UBLK_IO_OP_ZONE_FINISH:
	case UBLK_IO_OP_ZONE_RESET:
		if (sector != zstart(zs, i))
			return -EIO;
		return zone_mgmt(zs, op, i);
	case UBLK_IO_OP_ZONE_RESET_ALL:
		return reset_all(zs);
	case UBLK_IO_OP_REPORT_ZONES:
		/* nr is the iod's nr_zones here (it shares the field with nr_sectors) */
		return report(zs, sector, nr, buf, buf_len);
	}
	/* DISCARD and WRITE_ZEROES: a zoned device announces neither */
	return -EOPNOTSUPP;
}
