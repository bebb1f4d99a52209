/*
 * The I/O floor under bench/blk_plane.py: the same random 4 KiB reads of the same image,
 * ``depth`` at a time through one io_uring, with no device at all (no ring walk, no
 * parsing, no status byte, no used ring, no interrupt). The thread's CPU time per read is
 * what the host kernel charges for the read itself, which the device's figure includes.
 *
 * Built by bench/blk_plane.py with gcc -O2 -shared -fPIC -luring; called through ctypes.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <liburing.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define BS 4096

static double thread_cpu(void)
{
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* us of thread CPU per read, or a negative errno */
double uring_reads_us(const char *path, unsigned depth, uint64_t requests, uint64_t blocks)
{
    struct io_uring ring;
    struct io_uring_cqe *cqe;
    struct iovec *iov;
    uint8_t *buf;
    uint64_t done = 0, seed = 1;
    double t0, used;
    unsigned i;
    int rc, fd = open(path, O_RDONLY | O_CLOEXEC);

    if (fd < 0)
        return -1.0;
    rc = io_uring_queue_init(depth, &ring, 0);
    if (rc < 0) {
        close(fd);
        return rc;
    }
    buf = aligned_alloc(BS, (size_t)depth * BS);
    iov = calloc(depth, sizeof(*iov));
    t0 = thread_cpu();
    while (done < requests) {
        for (i = 0; i < depth; i++) {
            struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
            seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
            iov[i].iov_base = buf + (size_t)i * BS;
            iov[i].iov_len = BS;
            io_uring_prep_readv(sqe, fd, &iov[i], 1, (seed >> 33) % blocks * BS);
        }
        rc = io_uring_submit_and_wait(&ring, depth);
        if (rc < 0)
            break;
        for (i = 0; i < depth; i++) {
            if (io_uring_wait_cqe(&ring, &cqe) < 0 || cqe->res != BS) {
                rc = -1;
                break;
            }
            io_uring_cqe_seen(&ring, cqe);
        }
        if (rc < 0)
            break;
        done += depth;
    }
    used = thread_cpu() - t0;
    free(iov);
    free(buf);
    io_uring_queue_exit(&ring);
    close(fd);
    return rc < 0 ? rc : used / done * 1e6;
}
