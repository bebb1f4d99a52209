/*
 * The device floor under bench/blk_plane.py: a blk-like device written in C that serves
 * the same rounds as the bench's driver makes, with nothing of emu in it. A driver thread
 * clears ``depth`` 4 KiB buffers (the Python driver zeroes them too), pauses as long as the
 * Python driver takes to fill a round, kicks an eventfd and sleeps on another; the device
 * thread sleeps in epoll on the kick, reads it, makes the ``depth`` random reads through
 * one io_uring into those buffers and wakes the driver through its eventfd (the interrupt).
 *
 * The device thread's CPU per read is what a plain C device pays on this machine for one
 * round of this shape: the reads, the sleep and wake-up on a kick, the interrupt's wake-up
 * of the driver, the buffers' cache lines coming from the driver's CPU. Nothing of a ring,
 * a header or a status byte is in it.
 *
 * Built by bench/blk_plane.py with gcc -O2 -shared -fPIC -luring -lpthread; called through
 * ctypes.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <liburing.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define BS 4096

struct bench {
    int file, kick, irq;
    unsigned depth;
    uint64_t rounds, blocks;
    uint8_t *buf;
    volatile int failed; /* the device could not start: the driver stops */
    double device_us;    /* thread CPU per read; negative: something failed */
};

static double clock_s(clockid_t id)
{
    struct timespec t;
    clock_gettime(id, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *device(void *arg)
{
    struct bench *b = arg;
    struct io_uring ring;
    struct io_uring_cqe *cqe;
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = b->kick};
    struct iovec *iov = calloc(b->depth, sizeof(*iov));
    uint64_t seed = 1, count;
    double t0 = 0;
    int ep = epoll_create1(EPOLL_CLOEXEC), rc = io_uring_queue_init(b->depth, &ring, 0);

    if (rc < 0 || ep < 0 || !iov || epoll_ctl(ep, EPOLL_CTL_ADD, b->kick, &ev) < 0) {
        b->failed = 1;
        count = 1;
        if (write(b->irq, &count, 8) != 8) /* let the driver go */
            b->device_us = -1.0;
        if (ep >= 0)
            close(ep);
        if (rc >= 0)
            io_uring_queue_exit(&ring);
        free(iov);
        return NULL;
    }
    for (uint64_t r = 0; r <= b->rounds; r++) { /* round 0 warms up */
        if (r == 1)
            t0 = clock_s(CLOCK_THREAD_CPUTIME_ID);
        while (epoll_wait(ep, &ev, 1, -1) != 1)
            ;
        if (read(b->kick, &count, 8) != 8)
            rc = -1;
        for (unsigned i = 0; i < b->depth; i++) {
            struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
            seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
            iov[i].iov_base = b->buf + (size_t)i * BS;
            iov[i].iov_len = BS;
            io_uring_prep_readv(sqe, b->file, &iov[i], 1, (seed >> 33) % b->blocks * BS);
        }
        if (io_uring_submit_and_wait(&ring, b->depth) < 0)
            rc = -1;
        for (unsigned i = 0; i < b->depth; i++) {
            if (io_uring_wait_cqe(&ring, &cqe) < 0 || cqe->res != BS)
                rc = -1;
            else
                io_uring_cqe_seen(&ring, cqe);
        }
        count = 1;
        if (write(b->irq, &count, 8) != 8)
            rc = -1;
    }
    b->device_us = rc < 0 ? -1.0 : (clock_s(CLOCK_THREAD_CPUTIME_ID) - t0) / (b->rounds * b->depth) * 1e6;
    io_uring_queue_exit(&ring);
    close(ep);
    free(iov);
    return NULL;
}

/* us of the device thread's CPU per read, or a negative number when something failed.
 * ``pause_us``: the driver's time per round between the interrupt and its next kick. */
double uring_device_us(const char *path, unsigned depth, uint64_t rounds, uint64_t blocks,
                       double pause_us)
{
    struct bench b = {.depth = depth, .rounds = rounds, .blocks = blocks, .device_us = -1.0};
    pthread_t thread;
    uint64_t count;

    b.file = open(path, O_RDONLY | O_CLOEXEC);
    b.kick = eventfd(0, EFD_CLOEXEC);
    b.irq = eventfd(0, EFD_CLOEXEC);
    b.buf = aligned_alloc(BS, (size_t)depth * BS);
    if (b.file < 0 || b.kick < 0 || b.irq < 0 || !b.buf)
        goto out;
    if (pthread_create(&thread, NULL, device, &b))
        goto out;
    for (uint64_t r = 0; r <= rounds && !b.failed; r++) {
        double until = clock_s(CLOCK_MONOTONIC) + pause_us * 1e-6;
        do
            memset(b.buf, 0, (size_t)depth * BS);
        while (clock_s(CLOCK_MONOTONIC) < until);
        count = 1;
        if (write(b.kick, &count, 8) != 8 || read(b.irq, &count, 8) != 8)
            break;
    }
    pthread_join(thread, NULL);
out:
    free(b.buf);
    if (b.file >= 0)
        close(b.file);
    if (b.kick >= 0)
        close(b.kick);
    if (b.irq >= 0)
        close(b.irq);
    return b.device_us;
}
