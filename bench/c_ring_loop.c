/*
 * Plain-C pop+push loop over a split or packed ring: the practical speed limit that
 * bench/ring.py compares the Cython core against.
 *
 * It does the work the ring core does per chain, minus Python: read the avail index (split)
 * or head flags (packed), read ring entries, walk descriptors with the same checks (head
 * range, in flight, loop counter, INDIRECT refused, readable-after-writable, region bounds
 * without 2^64 wrap, 32-bit total length), fill flat output arrays (heads, chain starts,
 * addr, len, writable), record in-flight chains; then push them back: validate, write used
 * elements / used descriptors with dirty marking, publish with a release fence, and make the
 * event-idx notification decision after a full fence. When the ring runs dry it refills it
 * the way bench/ring.py does for the Python-driven cores (see there).
 *
 * Built by bench/ring.py with gcc -O2 -shared -fPIC; called through ctypes with N chains per
 * call so the call overhead is amortised.
 */
#include <stdint.h>
#include <string.h>

#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4
#define F_AVAIL (1 << 7)
#define F_USED (1 << 15)

struct bench_ring {
    uint8_t *ram; /* one guest region */
    uint64_t gpa, ram_size;
    uint8_t *dirty;
    uint64_t desc, driver, device;
    uint32_t size, batch, packed, event_idx;
    const uint8_t *image[2]; /* packed refill: descriptor ring images for wrap 0 / 1 */
    uint32_t *nd;            /* [size] descriptors per in-flight head, 0 = free */
    uint64_t *seq;           /* [size] fetch number */
    uint16_t *heads;         /* [size] */
    uint32_t *starts;        /* [size + 1] */
    uint64_t *addr;          /* [segcap] */
    uint32_t *len;           /* [segcap] */
    uint8_t *wr;             /* [segcap] */
    uint32_t *push_len;      /* [batch] */
    uint64_t segcap, nfetched, notifies;
    uint32_t next_avail, next_used, signalled_used, avail_wrap, used_wrap, refill_wrap;
};

static inline uint16_t ld16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void st16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void st32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

static inline int in_ram(const struct bench_ring *r, uint64_t a, uint64_t n)
{
    uint64_t off;
    if (n > UINT64_MAX - a || a < r->gpa)
        return 0;
    off = a - r->gpa;
    return off <= r->ram_size && n <= r->ram_size - off;
}

static inline uint8_t *host(const struct bench_ring *r, uint64_t a) { return r->ram + (a - r->gpa); }

static inline void mark(struct bench_ring *r, uint64_t a, uint64_t n)
{
    r->dirty[(a - r->gpa) >> 12] = 1;
    r->dirty[(a - r->gpa + n - 1) >> 12] = 1;
}

static inline int need_event(uint16_t ev, uint16_t new, uint16_t old)
{
    return (uint16_t)(new - ev - 1) < (uint16_t)(new - old);
}

/* one buffer: order, bounds, total length, append */
static inline int seg(struct bench_ring *r, uint32_t *m, uint64_t *total, int *wrote,
                      uint64_t a, uint32_t n, uint16_t flags)
{
    int w = (flags & F_WRITE) != 0;
    if ((*wrote && !w) || (flags & F_INDIRECT) || !in_ram(r, a, n))
        return -1;
    *total += n;
    if (*total > 0xFFFFFFFFu || *m == r->segcap)
        return -1;
    r->addr[*m] = a;
    r->len[*m] = n;
    r->wr[*m] = (uint8_t)w;
    (*m)++;
    *wrote |= w;
    return 0;
}

static inline void fetched(struct bench_ring *r, uint32_t *k, uint32_t m, uint16_t head,
                           uint32_t nd)
{
    r->heads[*k] = head;
    r->starts[++*k] = m;
    r->nd[head] = nd;
    r->seq[head] = r->nfetched++;
}

static int pop_split(struct bench_ring *r, uint32_t *k)
{
    const uint8_t *avail = host(r, r->driver), *table = host(r, r->desc);
    uint16_t n = (uint16_t)(ld16(avail + 2) - r->next_avail);
    uint32_t m = 0;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (n > r->size)
        return -1;
    if (n > r->batch)
        n = (uint16_t)r->batch;
    *k = 0;
    r->starts[0] = 0;
    for (uint32_t c = 0; c < n; c++) {
        uint16_t head = ld16(avail + 4 + 2 * (r->next_avail & (r->size - 1)));
        uint32_t i = head, steps = 0, nd = 0;
        uint16_t flags;
        uint64_t total = 0;
        int wrote = 0;
        const uint8_t *d;
        if (head >= r->size || r->nd[head])
            return -1;
        for (;;) {
            if (++steps > r->size)
                return -1;
            d = table + 16 * i;
            flags = ld16(d + 12);
            nd++;
            if (seg(r, &m, &total, &wrote, ld64(d), ld32(d + 8), flags))
                return -1;
            if (!(flags & F_NEXT))
                break;
            i = ld16(d + 14);
            if (i >= r->size)
                return -1;
        }
        fetched(r, k, m, head, nd);
        r->next_avail = (r->next_avail + 1) & 0xFFFF;
    }
    return 0;
}

static int push_split(struct bench_ring *r, uint32_t n)
{
    uint8_t *used = host(r, r->device);
    const uint8_t *avail = host(r, r->driver);
    uint16_t old;
    for (uint32_t i = 0; i < n; i++) {
        uint16_t h = r->heads[i];
        uint32_t at = 4 + 8 * (r->next_used & (r->size - 1));
        if (h >= r->size || !r->nd[h])
            return -1;
        r->nd[h] = 0;
        st32(used + at, h);
        st32(used + at + 4, r->push_len[i]);
        mark(r, r->device + at, 8);
        r->next_used = (r->next_used + 1) & 0xFFFF;
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);
    st16(used + 2, (uint16_t)r->next_used);
    mark(r, r->device + 2, 2);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    old = (uint16_t)r->signalled_used;
    r->signalled_used = r->next_used;
    if (r->event_idx)
        r->notifies += need_event(ld16(avail + 4 + 2 * r->size), (uint16_t)r->next_used, old);
    else
        r->notifies += !(ld16(avail) & 1);
    return 0;
}

static inline int packed_avail(const struct bench_ring *r, const uint8_t *ring)
{
    uint16_t f = ld16(ring + 16 * r->next_avail + 14);
    return ((f & F_AVAIL) != 0) == (int)r->avail_wrap && ((f & F_USED) != 0) != (int)r->avail_wrap;
}

static int pop_packed(struct bench_ring *r, uint32_t *k)
{
    const uint8_t *ring = host(r, r->desc);
    uint32_t m = 0;
    *k = 0;
    r->starts[0] = 0;
    while (*k < r->batch && packed_avail(r, ring)) {
        uint32_t slot = r->next_avail, steps = 0, wrap = r->avail_wrap;
        uint64_t total = 0;
        int wrote = 0;
        uint16_t flags, id;
        const uint8_t *d;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        do {
            if (++steps > r->size)
                return -1;
            d = ring + 16 * slot;
            flags = ld16(d + 14);
            id = ld16(d + 12);
            if (seg(r, &m, &total, &wrote, ld64(d), ld32(d + 8), flags))
                return -1;
            if (++slot == r->size) {
                slot = 0;
                wrap = !wrap;
            }
        } while (flags & F_NEXT);
        if (id >= r->size || r->nd[id])
            return -1;
        fetched(r, k, m, id, steps);
        r->next_avail = slot;
        r->avail_wrap = wrap;
    }
    return 0;
}

static int push_packed(struct bench_ring *r, uint32_t n)
{
    uint8_t *ring = host(r, r->desc);
    const uint8_t *ev = host(r, r->driver);
    uint32_t first_at = 0, used = r->next_used, advanced;
    uint16_t first_flags = 0, off_wrap, event, flags;
    for (uint32_t i = 0; i < n; i++) {
        uint16_t h = r->heads[i];
        uint32_t at = 16 * used;
        if (h >= r->size || !r->nd[h])
            return -1;
        flags = (r->used_wrap ? F_AVAIL | F_USED : 0) | (r->push_len[i] ? F_WRITE : 0);
        st32(ring + at + 8, r->push_len[i]);
        st16(ring + at + 12, h);
        mark(r, r->desc + at + 8, 6);
        if (i == 0) {
            first_at = at;
            first_flags = flags;
        } else {
            st16(ring + at + 14, flags);
            mark(r, r->desc + at + 14, 2);
        }
        used += r->nd[h];
        r->nd[h] = 0;
        if (used >= r->size) {
            used -= r->size;
            r->used_wrap = !r->used_wrap;
        }
    }
    r->next_used = used;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    st16(ring + first_at + 14, first_flags);
    mark(r, r->desc + first_at + 14, 2);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    advanced = (used + r->size - r->signalled_used) % r->size;
    if (!advanced)
        advanced = r->size;
    r->signalled_used = used;
    flags = ld16(ev + 2) & 3;
    if (flags == 1)
        return 0;
    if (flags != 2 || !r->event_idx) {
        r->notifies++;
        return 0;
    }
    off_wrap = ld16(ev);
    event = off_wrap & 0x7FFF;
    if ((off_wrap >> 15) != r->used_wrap)
        event = (uint16_t)(event - r->size);
    r->notifies += need_event(event, (uint16_t)used, (uint16_t)(used - advanced));
    return 0;
}

/* the driver side, identical to bench/ring.py's refill for the Python-driven cores */
static void refill(struct bench_ring *r)
{
    if (r->packed) {
        memcpy(host(r, r->desc), r->image[r->refill_wrap], 16 * (size_t)r->size);
        r->refill_wrap ^= 1;
    } else {
        uint8_t *idx = host(r, r->driver + 2);
        st16(idx, (uint16_t)(ld16(idx) + r->size));
    }
}

int bench_ring_check(const struct bench_ring *r)
{
    uint64_t s = r->size;
    if (r->packed)
        return in_ram(r, r->desc, 16 * s) && in_ram(r, r->driver, 4) && in_ram(r, r->device, 4);
    return in_ram(r, r->desc, 16 * s) && in_ram(r, r->driver, 6 + 2 * s) &&
           in_ram(r, r->device, 6 + 8 * s);
}

/* pop+push until ``chains`` chains went round; returns how many did, or -1 on a ring error */
int64_t bench_ring_run(struct bench_ring *r, uint64_t chains)
{
    uint64_t done = 0;
    uint32_t k;
    while (done < chains) {
        if (r->packed ? pop_packed(r, &k) : pop_split(r, &k))
            return -1;
        if (k == 0) {
            refill(r);
            continue;
        }
        if (r->packed ? push_packed(r, k) : push_split(r, k))
            return -1;
        done += k;
    }
    return (int64_t)done;
}
