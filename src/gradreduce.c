/* gradreduce: bucketed, non-blocking, rank-order gradient reduction (see gradreduce.h). */
#include "infmoe/gradreduce.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/dist.h"
#include "infmoe/util.h"

enum { QUEUED, EXCHANGE, GATHER, DONE };

typedef struct {
    float *buf;
    size_t n;
    float scale;
    int state, slot, nreq;
    long seq;
    MPI_Request *req; /* 2 (P-1): what the current exchange waits for */
} bucket;

struct grad_reducer {
    MPI_Comm comm;
    int P, rank, tag_pairs;
    size_t bucket_floats, piece_cap; /* piece_cap: the largest piece of a full bucket */
    int slots, *free_slot, n_free;
    float *scratch; /* slots x (P-1) x piece_cap */
    bucket *b;
    int n, cap, first_live; /* buckets queued this round; those before first_live are done */
    long seq;
};

grad_reducer *gradred_create(MPI_Comm comm, size_t bucket_floats, int slots) {
    ALWAYS(bucket_floats >= 1 && slots >= 1);
    grad_reducer *r = xcalloc(1, sizeof *r);
    MPI_CHECK(MPI_Comm_dup(comm, &r->comm));
    MPI_CHECK(MPI_Comm_size(r->comm, &r->P));
    MPI_CHECK(MPI_Comm_rank(r->comm, &r->rank));
    if (bucket_floats > ((size_t)1 << 28)) bucket_floats = (size_t)1 << 28; /* int counts */
    r->bucket_floats = bucket_floats;
    r->piece_cap = (bucket_floats + (size_t)r->P - 1) / (size_t)r->P;
    r->slots = slots;
    r->free_slot = xcalloc((size_t)slots, sizeof(int));
    for (int s = 0; s < slots; s++) r->free_slot[r->n_free++] = slots - 1 - s;
    if (r->P > 1)
        r->scratch = xcalloc((size_t)slots * (size_t)(r->P - 1) * r->piece_cap, sizeof(float));
    int *ub = NULL, has = 0;
    MPI_CHECK(MPI_Comm_get_attr(r->comm, MPI_TAG_UB, &ub, &has));
    r->tag_pairs = (has && *ub < (1 << 22) ? *ub : (1 << 22)) / 2;
    return r;
}

/* Piece q of a bucket of n floats: [first, first + len). */
static size_t piece_first(size_t n, int P, int q) { return n * (size_t)q / (size_t)P; }
static int piece_len(size_t n, int P, int q) {
    return (int)(piece_first(n, P, q + 1) - piece_first(n, P, q));
}

static float *slot_piece(const grad_reducer *r, const bucket *b, int q) {
    int idx = q < r->rank ? q : q - 1;
    return r->scratch + ((size_t)b->slot * (size_t)(r->P - 1) + (size_t)idx) * r->piece_cap;
}

static int tag_of(const grad_reducer *r, const bucket *b, int phase) {
    return (int)(b->seq % r->tag_pairs) * 2 + phase;
}

/* Phase 1: send piece q to rank q, receive every rank's copy of our piece. */
static void start_exchange(grad_reducer *r, bucket *b) {
    b->slot = r->free_slot[--r->n_free];
    b->nreq = 0;
    const int mine = piece_len(b->n, r->P, r->rank), tag = tag_of(r, b, 0);
    for (int q = 0; q < r->P; q++) {
        if (q == r->rank) continue;
        if (mine > 0)
            MPI_CHECK(MPI_Irecv(slot_piece(r, b, q), mine, MPI_FLOAT, q, tag, r->comm,
                                &b->req[b->nreq++]));
        int len = piece_len(b->n, r->P, q);
        if (len > 0)
            MPI_CHECK(MPI_Isend(b->buf + piece_first(b->n, r->P, q), len, MPI_FLOAT, q, tag,
                                r->comm, &b->req[b->nreq++]));
    }
    b->state = EXCHANGE;
}

/* Our piece's copies are here: sum them in rank order, scale, send the result to all. */
static void start_gather(grad_reducer *r, bucket *b) {
    const int P = r->P, me = r->rank, len = piece_len(b->n, P, me);
    float *own = b->buf + piece_first(b->n, P, me);
    float *acc = me == 0 ? own : slot_piece(r, b, 0);
    for (int q = 1; q < P; q++) {
        const float *v = q == me ? own : slot_piece(r, b, q);
#pragma omp parallel for simd if (len > (1 << 16))
        for (int i = 0; i < len; i++) acc[i] += v[i];
    }
    const float s = b->scale;
    if (acc != own || s != 1.0f) {
#pragma omp parallel for simd if (len > (1 << 16))
        for (int i = 0; i < len; i++) own[i] = acc[i] * s;
    }
    r->free_slot[r->n_free++] = b->slot;
    b->slot = -1;
    b->nreq = 0;
    const int tag = tag_of(r, b, 1);
    for (int q = 0; q < P; q++) {
        if (q == me) continue;
        int theirs = piece_len(b->n, P, q);
        if (theirs > 0)
            MPI_CHECK(MPI_Irecv(b->buf + piece_first(b->n, P, q), theirs, MPI_FLOAT, q, tag,
                                r->comm, &b->req[b->nreq++]));
        if (len > 0)
            MPI_CHECK(MPI_Isend(own, len, MPI_FLOAT, q, tag, r->comm, &b->req[b->nreq++]));
    }
    b->state = GATHER;
}

/* The bucket's current exchange is complete: take the next step. */
static void step(grad_reducer *r, bucket *b) {
    if (b->state == EXCHANGE) {
        start_gather(r, b);
    } else if (b->state == GATHER) {
        b->state = DONE;
        free(b->req);
        b->req = NULL;
    }
}

/* Test (or, blocking, wait for) one bucket's exchange and move it on when complete. */
static int advance(grad_reducer *r, bucket *b, int blocking) {
    if (b->state != EXCHANGE && b->state != GATHER) return 0;
    int flag = 1;
    if (b->nreq > 0) {
        if (blocking)
            MPI_CHECK(MPI_Waitall(b->nreq, b->req, MPI_STATUSES_IGNORE));
        else
            MPI_CHECK(MPI_Testall(b->nreq, b->req, &flag, MPI_STATUSES_IGNORE));
    }
    if (flag) step(r, b);
    return flag;
}

/* Start queued buckets, oldest first, while slots are free. */
static void start_queued(grad_reducer *r) {
    for (int i = r->first_live; i < r->n && r->n_free > 0; i++)
        if (r->b[i].state == QUEUED) start_exchange(r, &r->b[i]);
}

static void skip_done(grad_reducer *r) {
    while (r->first_live < r->n && r->b[r->first_live].state == DONE) r->first_live++;
}

void gradred_progress(grad_reducer *r) {
    if (!r || r->P == 1) return;
    for (int i = r->first_live; i < r->n; i++) advance(r, &r->b[i], 0);
    skip_done(r);
    start_queued(r);
}

void gradred_add(grad_reducer *r, float *buf, size_t n, float scale) {
    if (r->P == 1) { /* nothing to exchange: the sum is the buffer itself */
        if (scale != 1.0f)
            for (size_t i = 0; i < n; i++) buf[i] *= scale;
        return;
    }
    for (size_t off = 0; off < n; off += r->bucket_floats) {
        if (r->n == r->cap) {
            r->cap = r->cap ? 2 * r->cap : 64;
            r->b = xrealloc(r->b, (size_t)r->cap * sizeof *r->b);
        }
        bucket *b = &r->b[r->n++];
        memset(b, 0, sizeof *b);
        b->buf = buf + off;
        b->n = n - off < r->bucket_floats ? n - off : r->bucket_floats;
        b->scale = scale;
        b->state = QUEUED;
        b->slot = -1;
        b->seq = r->seq++;
        b->req = xcalloc((size_t)(2 * (r->P - 1)), sizeof(MPI_Request));
    }
    gradred_progress(r);
}

void gradred_wait(grad_reducer *r) {
    if (!r || r->P == 1) return;
    for (;;) {
        gradred_progress(r);
        if (r->first_live == r->n) break;
        /* block on the oldest bucket in flight (one is: a slot is free whenever none is) */
        for (int i = r->first_live; i < r->n; i++)
            if (r->b[i].state != QUEUED && r->b[i].state != DONE) {
                advance(r, &r->b[i], 1);
                break;
            }
    }
    r->n = r->first_live = 0;
}

void gradred_free(grad_reducer *r) {
    if (!r) return;
    gradred_wait(r);
    MPI_CHECK(MPI_Comm_free(&r->comm));
    free(r->b);
    free(r->scratch);
    free(r->free_slot);
    free(r);
}
