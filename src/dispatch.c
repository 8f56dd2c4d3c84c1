/* dispatch: the all-to-all exchange of token rows (see dispatch.h). */
#include "infmoe/dispatch.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/bf16.h"
#include "infmoe/dist.h"
#include "infmoe/util.h"

void dispatch_init(dispatch_plan *p, MPI_Comm comm) {
    memset(p, 0, sizeof *p);
    p->comm = comm;
    if (comm != MPI_COMM_NULL) MPI_CHECK(MPI_Comm_size(comm, &p->size));
    size_t n = (size_t)(p->size > 0 ? p->size : 1);
    p->send_rows = xcalloc(n, sizeof(int));
    p->recv_rows = xcalloc(n, sizeof(int));
    p->scount = xcalloc(n, sizeof(int));
    p->sdispl = xcalloc(n, sizeof(int));
    p->rcount = xcalloc(n, sizeof(int));
    p->rdispl = xcalloc(n, sizeof(int));
}

void dispatch_free(dispatch_plan *p) {
    free(p->send_rows);
    free(p->recv_rows);
    free(p->scount);
    free(p->sdispl);
    free(p->rcount);
    free(p->rdispl);
    memset(p, 0, sizeof *p);
}

/*
 * Stable counting sort of items 0..n-1 by bucket[i] in [0, nb) (< 0: left out):
 * start (nb + 1) gets each bucket's first position, item[pos] the item at each
 * position, slot[i] (may be NULL) item i's position or -1. Returns the positions
 * filled. The send order and the grouping of received rows are both this sort.
 */
static int64_t sort_by_bucket(const int32_t *bucket, int64_t n, int nb, int64_t *start, int32_t *slot,
                              int32_t *item) {
    ALWAYS(n <= INT32_MAX);
    memset(start, 0, sizeof(int64_t) * ((size_t)nb + 1));
    for (int64_t i = 0; i < n; i++) {
        ALWAYS(bucket[i] < nb);
        if (bucket[i] >= 0) start[bucket[i] + 1]++;
    }
    for (int b = 0; b < nb; b++) start[b + 1] += start[b];
    int64_t *fill = xmalloc(sizeof(int64_t) * ((size_t)nb + 1));
    memcpy(fill, start, sizeof(int64_t) * ((size_t)nb + 1));
    for (int64_t i = 0; i < n; i++) {
        int64_t s = bucket[i] >= 0 ? fill[bucket[i]]++ : -1;
        if (slot) slot[i] = (int32_t)s;
        if (s >= 0) item[s] = (int32_t)i;
    }
    free(fill);
    return start[nb];
}

int64_t dispatch_order(dispatch_plan *p, const int32_t *bucket, int64_t n_items, int n_buckets,
                       int buckets_per_rank, int32_t *slot, int32_t *item) {
    ALWAYS(p->comm != MPI_COMM_NULL && n_buckets == buckets_per_rank * p->size);
    int64_t *start = xmalloc(sizeof(int64_t) * ((size_t)n_buckets + 1));
    int64_t n_send = sort_by_bucket(bucket, n_items, n_buckets, start, slot, item);
    for (int r = 0; r < p->size; r++) {
        int64_t rows = start[(r + 1) * buckets_per_rank] - start[r * buckets_per_rank];
        if (rows > INT_MAX) INFMOE_FAIL("dispatch of %lld rows to one rank exceeds MPI's int counts", (long long)rows);
        p->send_rows[r] = (int)rows;
    }
    free(start);
    return n_send;
}

/* Element counts and displacements for rows of `width` (MPI counts are int). */
static void set_counts(int *count, int *displ, const int *rows, int size, int width) {
    int64_t off = 0;
    for (int r = 0; r < size; r++) {
        int64_t c = (int64_t)rows[r] * width;
        if (c > INT_MAX || off > INT_MAX)
            INFMOE_FAIL("dispatch of %lld elements exceeds MPI's int counts", (long long)(off + c));
        count[r] = (int)c;
        displ[r] = (int)off;
        off += c;
    }
}

static int64_t g_bytes_sent;

int64_t dispatch_bytes_sent(void) { return g_bytes_sent; }

/* fp32 rows travel as MPI_FLOAT, bf16 rows (bit patterns) as MPI_UINT16_T. */
static MPI_Datatype elem_type(size_t elem) {
    ALWAYS(elem == sizeof(float) || elem == sizeof(uint16_t));
    return elem == sizeof(float) ? MPI_FLOAT : MPI_UINT16_T;
}

int64_t dispatch_send(dispatch_plan *p, const void *send, void *recv, int width, size_t elem,
                      int64_t max_recv) {
    MPI_CHECK(MPI_Alltoall(p->send_rows, 1, MPI_INT, p->recv_rows, 1, MPI_INT, p->comm));
    p->n_send = p->n_recv = 0;
    for (int r = 0; r < p->size; r++) {
        p->n_send += p->send_rows[r];
        p->n_recv += p->recv_rows[r];
    }
    if (p->n_recv > max_recv)
        INFMOE_FAIL("%lld rows arrive for this rank's experts or units, more than the %lld planned",
                    (long long)p->n_recv, (long long)max_recv);
    dispatch_forward(p, send, recv, width, elem);
    return p->n_recv;
}

void dispatch_forward(dispatch_plan *p, const void *send, void *recv, int width, size_t elem) {
    set_counts(p->scount, p->sdispl, p->send_rows, p->size, width);
    set_counts(p->rcount, p->rdispl, p->recv_rows, p->size, width);
    MPI_Datatype t = elem_type(elem);
    MPI_CHECK(MPI_Alltoallv(send, p->scount, p->sdispl, t, recv, p->rcount, p->rdispl, t, p->comm));
    g_bytes_sent += p->n_send * width * (int64_t)elem;
}

void dispatch_reverse(dispatch_plan *p, const void *back, void *out, int width, size_t elem) {
    set_counts(p->scount, p->sdispl, p->send_rows, p->size, width);
    set_counts(p->rcount, p->rdispl, p->recv_rows, p->size, width);
    MPI_Datatype t = elem_type(elem);
    MPI_CHECK(MPI_Alltoallv(back, p->rcount, p->rdispl, t, out, p->scount, p->sdispl, t, p->comm));
    g_bytes_sent += p->n_recv * width * (int64_t)elem;
}

void dispatch_groups_init(dispatch_groups *g, int n_buckets, int64_t cap) {
    g->n_buckets = n_buckets;
    g->cap = cap;
    g->start = xcalloc((size_t)n_buckets + 1, sizeof(int64_t));
    g->row = xcalloc((size_t)(cap > 0 ? cap : 1), sizeof(int32_t));
}

void dispatch_groups_free(dispatch_groups *g) {
    free(g->start);
    free(g->row);
    memset(g, 0, sizeof *g);
}

void dispatch_group_by_id(dispatch_groups *g, const int32_t *bucket, int64_t n_rows) {
    ALWAYS(n_rows <= g->cap);
    for (int64_t i = 0; i < n_rows; i++) ALWAYS(bucket[i] >= 0); /* every received row has one */
    sort_by_bucket(bucket, n_rows, g->n_buckets, g->start, NULL, g->row);
}

void dispatch_group_by_flags(dispatch_groups *g, const uint8_t *member, int64_t n_rows) {
    const int nb = g->n_buckets;
    memset(g->start, 0, sizeof(int64_t) * ((size_t)nb + 1));
    for (int64_t i = 0; i < n_rows; i++)
        for (int b = 0; b < nb; b++) g->start[b + 1] += member[i * nb + b] != 0;
    for (int b = 0; b < nb; b++) g->start[b + 1] += g->start[b];
    ALWAYS(g->start[nb] <= g->cap);
    int64_t *fill = xmalloc(sizeof(int64_t) * ((size_t)nb + 1));
    memcpy(fill, g->start, sizeof(int64_t) * (size_t)nb);
    for (int64_t i = 0; i < n_rows; i++)
        for (int b = 0; b < nb; b++)
            if (member[i * nb + b]) g->row[fill[b]++] = (int32_t)i;
    free(fill);
}

void dispatch_gather(void *dst, const void *src, int64_t src_stride, const int32_t *idx,
                     int64_t n, int width, size_t elem) {
    char *d = dst;
    const char *s = src;
#pragma omp parallel for
    for (int64_t r = 0; r < n; r++)
        memcpy(d + (size_t)(r * width) * elem, s + (size_t)((int64_t)idx[r] * src_stride) * elem,
               elem * (size_t)width);
}

void dispatch_scatter(void *dst, int64_t dst_stride, const void *src, const int32_t *idx,
                      int64_t n, int width, size_t elem) {
    char *d = dst;
    const char *s = src;
#pragma omp parallel for
    for (int64_t r = 0; r < n; r++)
        memcpy(d + (size_t)((int64_t)idx[r] * dst_stride) * elem, s + (size_t)(r * width) * elem,
               elem * (size_t)width);
}

void dispatch_scatter_add(float *dst, int64_t dst_stride, const float *src, const int32_t *idx,
                          int64_t n, int width) {
    for (int64_t r = 0; r < n; r++) {
        float *o = dst + (int64_t)idx[r] * dst_stride;
        const float *y = src + r * width;
#pragma omp simd
        for (int c = 0; c < width; c++) o[c] += y[c];
    }
}

void dispatch_scatter_add_bf16(float *dst, int64_t dst_stride, const bf16 *src, const int32_t *idx,
                               int64_t n, int width) {
    for (int64_t r = 0; r < n; r++) {
        float *o = dst + (int64_t)idx[r] * dst_stride;
        const bf16 *y = src + r * width;
#pragma omp simd
        for (int c = 0; c < width; c++) o[c] += bf16_float(y[c]);
    }
}
