/* SPDX-License-Identifier: MIT */
/*
 * Control commands on /dev/ublk-control. They are rare, so each one gets a
 * small ring of its own: no state to share between Python threads.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/vfs.h>
#include <linux/magic.h>

#include "ushell.h"

int us_ctrl_cmd(int ctrl_fd, unsigned cmd_op, struct ublksrv_ctrl_cmd *cmd)
{
	struct io_uring ring;
	struct io_uring_sqe *sqe;
	struct io_uring_cqe *cqe;
	int ret;

	/* the driver rejects commands from rings without 128-byte SQEs */
	ret = io_uring_queue_init(4, &ring, IORING_SETUP_SQE128);
	if (ret < 0)
		return ret;
	sqe = io_uring_get_sqe(&ring);
	us_sqe128_zero(sqe);
	sqe->opcode = IORING_OP_URING_CMD;
	sqe->fd = ctrl_fd;
	sqe->cmd_op = cmd_op;
	memcpy(us_sqe_cmd(sqe), cmd, sizeof(*cmd));
	ret = io_uring_submit(&ring);
	if (ret >= 0) {
		do {
			ret = io_uring_wait_cqe(&ring, &cqe);
		} while (ret == -EINTR);
		if (!ret) {
			ret = cqe->res;
			io_uring_cqe_seen(&ring, cqe);
		}
	}
	io_uring_queue_exit(&ring);
	return ret;
}

int us_probe_direct(int fd)
{
	static const int sizes[] = { 512, 4096 };
	char *buf;
	unsigned i;
	int ret = 0;

	if (posix_memalign((void **)&buf, 4096, 4096))
		return 0;
	for (i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		if (pread(fd, buf, sizes[i], 0) >= 0) {
			ret = sizes[i];
			break;
		}
	}
	free(buf);
	return ret;
}

int us_fd_in_memory(int fd)
{
	struct statfs sf;

	if (fstatfs(fd, &sf) < 0)
		return 0;
	return sf.f_type == TMPFS_MAGIC || sf.f_type == RAMFS_MAGIC;
}
