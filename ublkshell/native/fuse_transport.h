/* SPDX-License-Identifier: MIT */
/*
 * Inside the FUSE transport: fuse_transport.c is the front end (tags, the
 * queue thread, the IO requests), fuse_session.c the file system around it
 * (names, attributes, the session, mounting). Not for cffi.
 */
#ifndef USHELL_FUSE_TRANSPORT_H
#define USHELL_FUSE_TRANSPORT_H

#include <fuse_lowlevel.h>

#include "ushell.h"
#include "fuse_api.h"

#define DISK_INO	2
#define DISK_NAME	"disk"
#define ATTR_TIMEOUT	1.0

#ifndef FALLOC_FL_WRITE_ZEROES
#define FALLOC_FL_WRITE_ZEROES	0x80	/* 6.17+: zeroes written, never a hole */
#endif

/* the queue thread's life, under f->lock */
enum { Q_STARTING, Q_SERVING, Q_FAILED, Q_ENDED };

struct us_fuse {
	struct us_fuse_cfg cfg;
	char		*mountpoint;
	struct fuse_session *se;
	pthread_t	thr;
	int		thr_started;
	struct timespec	t0;		/* the file's times: when the device came up */

	struct us_dev	*d;		/* the pipeline's device: one queue, fe_data = this */
	pthread_t	qthr;
	int		qthr_started;
	int		bell_efd;	/* workers -> queue thread: tags were handed over */
	pthread_mutex_t	lock;		/* the tags, the hand-over list, q_state */
	pthread_cond_t	cond;		/* a tag came free, q_state changed */
	int		q_state;
	int		q_error;
	unsigned	*free_tags, nr_free;
	unsigned	nr_filling;	/* tags workers took and still fill: their buffers must stay */
	unsigned	*handed, nr_handed;	/* filled tags the queue thread has not taken yet */
	unsigned	*batch;		/* the queue thread's copy of handed */
	fuse_req_t	*reqs;		/* per tag: the request to answer, NULL when answered */

	/* the session loop's end */
	pthread_mutex_t	done_lock;
	pthread_cond_t	done_cond;
	int		done;
};

/* fuse_transport.c: the IO requests, served through the pipeline */
void fx_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi);
void fx_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
	      struct fuse_file_info *fi);
void fx_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi);
void fx_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len,
		  struct fuse_file_info *fi);
/* the pipeline's device for f (target init, power-cut log); NULL with *err = -errno */
struct us_dev *fx_dev_new(struct us_fuse *f, int *err);
void fx_dev_free(struct us_dev *d);
/* start the queue thread and wait until it serves: 0 or -errno */
int fx_start_queue(struct us_fuse *f);

#endif
