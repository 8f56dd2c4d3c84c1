/* dispatch: the all-to-all exchange of token rows (see dispatch.h). */
#include "infmoe/dispatch.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/bf16.h"
#include "infmoe/dist.h"
#include "infmoe/util.h"

/* The probe (dispatch_set_probe): seconds in its barriers, and in the exchanges after them. */
static int g_probe;
static double g_probe_wait, g_probe_move;

static void plan_init(dispatch_plan *p, MPI_Comm comm) {
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

static int cmp_int(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

/*
 * The (node, local index) layout of comm from node (this rank's node, a split of
 * comm; taken over): NULL, with a note from comm's rank 0, when the nodes hold
 * unequal numbers of ranks.
 */
static dispatch_nodes *nodes_make(MPI_Comm comm, MPI_Comm node) {
    int rank, size, L, local, lmin, lmax;
    MPI_CHECK(MPI_Comm_rank(comm, &rank));
    MPI_CHECK(MPI_Comm_size(comm, &size));
    MPI_CHECK(MPI_Comm_size(node, &L));
    MPI_CHECK(MPI_Comm_rank(node, &local));
    MPI_CHECK(MPI_Allreduce(&L, &lmin, 1, MPI_INT, MPI_MIN, comm));
    MPI_CHECK(MPI_Allreduce(&L, &lmax, 1, MPI_INT, MPI_MAX, comm));
    if (lmin != lmax) {
        if (rank == 0)
            fprintf(stderr, "note: parallel.alltoall node: the nodes hold %d to %d ranks of an expert group, "
                            "not equally many; the flat all-to-all is used\n", lmin, lmax);
        MPI_CHECK(MPI_Comm_free(&node));
        return NULL;
    }
    dispatch_nodes *nd = xcalloc(1, sizeof *nd);
    nd->node = node;
    nd->per_node = L;
    nd->local = local;
    /* a node is named by the comm rank of its local rank 0; node ids in that order */
    int leader = rank, *leaders = xcalloc((size_t)size, sizeof(int));
    MPI_CHECK(MPI_Bcast(&leader, 1, MPI_INT, 0, node));
    MPI_CHECK(MPI_Allgather(&leader, 1, MPI_INT, leaders, 1, MPI_INT, comm));
    qsort(leaders, (size_t)size, sizeof(int), cmp_int);
    nd->n_nodes = 0;
    for (int i = 0; i < size; i++)
        if (i == 0 || leaders[i] != leaders[i - 1]) {
            if (leaders[i] == leader) nd->node_id = nd->n_nodes;
            nd->n_nodes++;
        }
    free(leaders);
    const int N = nd->n_nodes;
    int me[2] = {nd->node_id, local}, *all = xcalloc((size_t)size * 2, sizeof(int));
    MPI_CHECK(MPI_Allgather(me, 2, MPI_INT, all, 2, MPI_INT, comm));
    nd->global = xcalloc((size_t)N * L, sizeof(int));
    for (int r = 0; r < size; r++) nd->global[all[2 * r] * L + all[2 * r + 1]] = r;
    free(all);
    MPI_CHECK(MPI_Comm_split(comm, local, nd->node_id, &nd->cross));
    static int told; /* once a process: every layer's plan has the same layout */
    if (rank == 0 && !told++)
        printf("all-to-all: node-aware, %d node%s x %d ranks of each expert group\n", N, N == 1 ? "" : "s", L);
    size_t nl = (size_t)N * L;
    nd->sub = xcalloc(nl, sizeof(int));
    nd->rsub = xcalloc(nl, sizeof(int));
    int **counts[] = {&nd->c1, &nd->d1, &nd->rc1, &nd->rd1, &nd->c2, &nd->d2, &nd->rc2, &nd->rd2};
    for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++)
        *counts[i] = xcalloc((size_t)(L > N ? L : N), sizeof(int));
    return nd;
}

static void nodes_free(dispatch_nodes *nd) {
    if (!nd) return;
    MPI_CHECK(MPI_Comm_free(&nd->node));
    MPI_CHECK(MPI_Comm_free(&nd->cross));
    int *arrays[] = {nd->global, nd->sub, nd->rsub, nd->c1, nd->d1, nd->rc1, nd->rd1, nd->c2, nd->d2, nd->rc2, nd->rd2};
    for (size_t i = 0; i < sizeof arrays / sizeof arrays[0]; i++) free(arrays[i]);
    free(nd->buf[0]);
    free(nd->buf[1]);
    free(nd);
}

void dispatch_init(dispatch_plan *p, MPI_Comm comm, int node_aware) {
    plan_init(p, comm);
    if (!node_aware || comm == MPI_COMM_NULL) return;
    int rank;
    MPI_Comm node;
    MPI_CHECK(MPI_Comm_rank(comm, &rank));
    MPI_CHECK(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node));
    p->nodes = nodes_make(comm, node);
}

void dispatch_init_nodes(dispatch_plan *p, MPI_Comm comm, MPI_Comm node_comm) {
    plan_init(p, comm);
    MPI_Comm node;
    MPI_CHECK(MPI_Comm_dup(node_comm, &node));
    p->nodes = nodes_make(comm, node);
}

static void flight_free(dispatch_flight *f) {
    free(f->count);
    free(f->displ);
    free(f->rcount);
    free(f->rdispl);
    free(f->req);
}

void dispatch_set_chunks(dispatch_plan *p, int chunks) {
    ALWAYS(!(g_probe && chunks > 1)); /* the probe times blocking exchanges only */
    ALWAYS(chunks >= 1 && !p->send_rows_c);
    ALWAYS(chunks == 1 || !p->nodes); /* the node-aware exchange runs in one piece */
    p->chunks = chunks;
    size_t n = (size_t)(p->size > 0 ? p->size : 1) * (size_t)chunks;
    p->send_rows_c = xcalloc(n, sizeof(int));
    p->recv_rows_c = xcalloc(n, sizeof(int));
    p->rstart = xcalloc((size_t)chunks + 1, sizeof(int64_t));
    for (int d = 0; d < 2; d++) {
        dispatch_flight *f = &p->flight[d];
        int **a[] = {&f->count, &f->displ, &f->rcount, &f->rdispl};
        for (int i = 0; i < 4; i++) *a[i] = xcalloc(n, sizeof(int));
        f->req = xmalloc(sizeof(MPI_Request) * (size_t)chunks);
        for (int g = 0; g < chunks; g++) f->req[g] = MPI_REQUEST_NULL;
    }
}

void dispatch_free(dispatch_plan *p) {
    nodes_free(p->nodes);
    free(p->send_rows_c);
    free(p->recv_rows_c);
    free(p->rstart);
    flight_free(&p->flight[0]);
    flight_free(&p->flight[1]);
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
    if (!p->send_rows_c) dispatch_set_chunks(p, 1);
    ALWAYS(p->chunks <= buckets_per_rank);
    p->buckets_per_rank = buckets_per_rank;
    int64_t *start = xmalloc(sizeof(int64_t) * ((size_t)n_buckets + 1));
    int64_t n_send = sort_by_bucket(bucket, n_items, n_buckets, start, slot, item);
    for (int r = 0; r < p->size; r++) {
        int64_t rows = start[(r + 1) * buckets_per_rank] - start[r * buckets_per_rank];
        if (rows > INT_MAX) INFMOE_FAIL("dispatch of %lld rows to one rank exceeds MPI's int counts", (long long)rows);
        p->send_rows[r] = (int)rows;
        for (int g = 0; g < p->chunks; g++) {
            int lo, hi;
            dispatch_chunk_buckets(p, g, &lo, &hi);
            p->send_rows_c[r * p->chunks + g] =
                (int)(start[r * buckets_per_rank + hi] - start[r * buckets_per_rank + lo]);
        }
    }
    free(start);
    return n_send;
}

void dispatch_chunk_buckets(const dispatch_plan *p, int chunk, int *lo, int *hi) {
    *lo = (int)((int64_t)chunk * p->buckets_per_rank / p->chunks);
    *hi = (int)((int64_t)(chunk + 1) * p->buckets_per_rank / p->chunks);
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

/* displ = prefix sums of count[0..n); the total, which must fit MPI's int counts */
static int64_t prefix(const int *count, int *displ, int n) {
    int64_t off = 0;
    for (int i = 0; i < n; i++) {
        if (off > INT_MAX) INFMOE_FAIL("node-aware dispatch of %lld elements exceeds MPI's int counts", (long long)off);
        displ[i] = (int)off;
        off += count[i];
    }
    if (off > INT_MAX) INFMOE_FAIL("node-aware dispatch of %lld elements exceeds MPI's int counts", (long long)off);
    return off;
}

static char *nodes_buf(dispatch_nodes *nd, int i, int64_t elems, size_t elem) {
    size_t need = (size_t)(elems > 0 ? elems : 1) * elem;
    if (need > nd->cap[i]) {
        nd->buf[i] = xrealloc(nd->buf[i], need);
        nd->cap[i] = need;
    }
    return nd->buf[i];
}

/*
 * The node-aware Alltoallv, same arguments and result as the flat one. Stage 1,
 * within the node: to local rank l', the rows for local index l' of every node,
 * node by node. Stage 2, among the ranks of this local index: to node m what the
 * node's ranks sent here for node m's rank of this index, sender by sender.
 * Then each block goes to where the flat exchange puts its source's rows.
 */
static void node_alltoallv(dispatch_nodes *nd, const void *send, const int *sc, const int *sd, void *recv,
                           const int *rc, const int *rd, size_t elem, MPI_Datatype t) {
    const int N = nd->n_nodes, L = nd->per_node;
    const char *in = send;
    int64_t total = 0;
    for (int i = 0; i < N * L; i++) total += sc[nd->global[i]];
    char *b0 = nodes_buf(nd, 0, total, elem);
    int64_t off = 0;
    for (int l = 0; l < L; l++) {
        nd->c1[l] = 0;
        for (int m = 0; m < N; m++) {
            int g = nd->global[m * L + l];
            memcpy(b0 + (size_t)off * elem, in + (size_t)sd[g] * elem, (size_t)sc[g] * elem);
            off += sc[g];
            nd->sub[l * N + m] = sc[g];
            nd->c1[l] += sc[g];
        }
    }
    prefix(nd->c1, nd->d1, L);
    MPI_CHECK(MPI_Alltoall(nd->sub, N, MPI_INT, nd->rsub, N, MPI_INT, nd->node));
    for (int l = 0; l < L; l++) {
        nd->rc1[l] = 0;
        for (int m = 0; m < N; m++) nd->rc1[l] += nd->rsub[l * N + m];
    }
    int64_t got1 = prefix(nd->rc1, nd->rd1, L);
    for (int n = 0; n < N; n++) {
        nd->rc2[n] = 0;
        for (int l = 0; l < L; l++) nd->rc2[n] += rc[nd->global[n * L + l]];
    }
    int64_t got2 = prefix(nd->rc2, nd->rd2, N);
    char *b1 = nodes_buf(nd, 1, got1 > got2 ? got1 : got2, elem);
    b0 = nodes_buf(nd, 0, got1 > total ? got1 : total, elem); /* stage 2 packs got1; keeps stage 1's */
    MPI_CHECK(MPI_Alltoallv(b0, nd->c1, nd->d1, t, b1, nd->rc1, nd->rd1, t, nd->node));
    /* stage 2: regroup by destination node, senders in local order */
    off = 0;
    for (int m = 0; m < N; m++) {
        nd->c2[m] = 0;
        for (int l = 0; l < L; l++) {
            int64_t at = nd->rd1[l];
            for (int q = 0; q < m; q++) at += nd->rsub[l * N + q];
            int c = nd->rsub[l * N + m];
            memcpy(b0 + (size_t)off * elem, b1 + (size_t)at * elem, (size_t)c * elem);
            off += c;
            nd->c2[m] += c;
        }
    }
    prefix(nd->c2, nd->d2, N);
    MPI_CHECK(MPI_Alltoallv(b0, nd->c2, nd->d2, t, b1, nd->rc2, nd->rd2, t, nd->cross));
    char *out = recv;
    off = 0;
    for (int n = 0; n < N; n++)
        for (int l = 0; l < L; l++) {
            int g = nd->global[n * L + l];
            memcpy(out + (size_t)rd[g] * elem, b1 + (size_t)off * elem, (size_t)rc[g] * elem);
            off += rc[g];
        }
}

void dispatch_set_probe(int on) { g_probe = on != 0; }

void dispatch_probe_times(double *wait, double *move) {
    *wait = g_probe_wait;
    *move = g_probe_move;
}

/* With the probe on: every rank of comm here, the wait counted; returns when the
 * exchange after it starts (0 with the probe off). */
static double probe_start(MPI_Comm comm) {
    if (!g_probe) return 0.0;
    double t0 = wall_time();
    MPI_CHECK(MPI_Barrier(comm));
    double t1 = wall_time();
    g_probe_wait += t1 - t0;
    return t1;
}

static void probe_end(double t1) {
    if (g_probe) g_probe_move += wall_time() - t1;
}

/* One exchange of rows: flat, or node-aware where the plan has nodes. */
static void alltoallv(dispatch_plan *p, const void *send, const int *sc, const int *sd, void *recv,
                      const int *rc, const int *rd, size_t elem, MPI_Datatype t) {
    double t1 = probe_start(p->comm);
    if (p->nodes) node_alltoallv(p->nodes, send, sc, sd, recv, rc, rd, elem, t);
    else MPI_CHECK(MPI_Alltoallv(send, sc, sd, t, recv, rc, rd, t, p->comm));
    probe_end(t1);
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
    double t1 = probe_start(p->comm);
    MPI_CHECK(MPI_Alltoall(p->send_rows, 1, MPI_INT, p->recv_rows, 1, MPI_INT, p->comm));
    probe_end(t1);
    p->n_send = p->n_recv = 0;
    for (int r = 0; r < p->size; r++) {
        p->n_send += p->send_rows[r];
        p->n_recv += p->recv_rows[r];
    }
    if (p->n_recv > max_recv)
        INFMOE_FAIL("%lld rows arrive for this rank's experts or units, more than the %lld planned",
                    (long long)p->n_recv, (long long)max_recv);
    if (p->rstart) { /* one chunk: all of them */
        p->rstart[0] = 0;
        p->rstart[1] = p->n_recv;
    }
    dispatch_forward(p, send, recv, width, elem);
    return p->n_recv;
}

void dispatch_forward(dispatch_plan *p, const void *send, void *recv, int width, size_t elem) {
    ALWAYS(p->chunks <= 1); /* chunked plans: dispatch_forward_start */
    set_counts(p->scount, p->sdispl, p->send_rows, p->size, width);
    set_counts(p->rcount, p->rdispl, p->recv_rows, p->size, width);
    MPI_Datatype t = elem_type(elem);
    alltoallv(p, send, p->scount, p->sdispl, recv, p->rcount, p->rdispl, elem, t);
    g_bytes_sent += p->n_send * width * (int64_t)elem;
}

void dispatch_reverse(dispatch_plan *p, const void *back, void *out, int width, size_t elem) {
    ALWAYS(p->chunks <= 1); /* chunked plans: dispatch_reverse_chunk */
    set_counts(p->scount, p->sdispl, p->send_rows, p->size, width);
    set_counts(p->rcount, p->rdispl, p->recv_rows, p->size, width);
    MPI_Datatype t = elem_type(elem);
    alltoallv(p, back, p->rcount, p->rdispl, out, p->scount, p->sdispl, elem, t);
    g_bytes_sent += p->n_recv * width * (int64_t)elem;
}

/* ---- chunked exchanges ---- */

static int fit_int(int64_t v) {
    if (v > INT_MAX) INFMOE_FAIL("dispatch of %lld elements exceeds MPI's int counts", (long long)v);
    return (int)v;
}

/* Chunk g's rows per peer r at the out exchange's receiver (rows, first row) and
 * at its sender. */
static void chunk_rows(const dispatch_plan *p, int g, int r, int64_t *rrows, int64_t *roff,
                       int64_t *srows, int64_t *soff) {
    const int D = p->chunks;
    *roff = p->rstart[g];
    for (int q = 0; q < r; q++) *roff += p->recv_rows_c[q * D + g];
    *rrows = p->recv_rows_c[r * D + g];
    *soff = 0;
    for (int q = 0; q < r; q++) *soff += p->send_rows[q];
    for (int h = 0; h < g; h++) *soff += p->send_rows_c[r * D + h];
    *srows = p->send_rows_c[r * D + g];
}

/* Chunk g's counts and displacements in f, rows of `width`: out (the rows the
 * sender sent to their receiver) or back (the same rows turned around). Returns
 * the rows this rank sends. */
static int64_t chunk_counts(const dispatch_plan *p, dispatch_flight *f, int g, int width, int back) {
    int64_t sent = 0;
    for (int r = 0; r < p->size; r++) {
        int i = g * p->size + r;
        int64_t rrows, roff, srows, soff;
        chunk_rows(p, g, r, &rrows, &roff, &srows, &soff);
        if (back) { /* what came from r goes back into the rows r sent */
            int64_t t = rrows;
            rrows = srows, srows = t;
            t = roff, roff = soff, soff = t;
        }
        f->count[i] = fit_int(srows * width);
        f->displ[i] = fit_int(soff * width);
        f->rcount[i] = fit_int(rrows * width);
        f->rdispl[i] = fit_int(roff * width);
        sent += srows;
    }
    return sent;
}

/* Post chunk g's exchange in direction d (0 out, 1 back). */
static void post_chunk(dispatch_plan *p, int d, int g, const void *send, void *recv, int width,
                       size_t elem) {
    dispatch_flight *f = &p->flight[d];
    ALWAYS(f->req[g] == MPI_REQUEST_NULL); /* its last exchange has ended */
    int64_t rows = chunk_counts(p, f, g, width, d);
    const int P = p->size;
    MPI_Datatype t = elem_type(elem);
    MPI_CHECK(MPI_Ialltoallv(send, f->count + g * P, f->displ + g * P, t, recv, f->rcount + g * P,
                             f->rdispl + g * P, t, p->comm, &f->req[g]));
    g_bytes_sent += rows * width * (int64_t)elem;
}

/* Post every chunk's exchange out (send in send order -> recv in chunked received
 * order). The sender's rows of chunk g for peer r follow its rows of the chunks
 * before g within r's segment. */
static void post_out(dispatch_plan *p, const void *send, void *recv, int width, size_t elem) {
    for (int g = 0; g < p->chunks; g++) post_chunk(p, 0, g, send, recv, width, elem);
}

int64_t dispatch_send_start(dispatch_plan *p, const void *send, void *recv, int width, size_t elem,
                            int64_t max_recv) {
    if (p->chunks == 1) return dispatch_send(p, send, recv, width, elem, max_recv);
    const int D = p->chunks, P = p->size;
    MPI_CHECK(MPI_Alltoall(p->send_rows_c, D, MPI_INT, p->recv_rows_c, D, MPI_INT, p->comm));
    p->n_send = p->n_recv = 0;
    for (int r = 0; r < P; r++) {
        p->send_rows[r] = p->recv_rows[r] = 0;
        for (int g = 0; g < D; g++) {
            p->send_rows[r] += p->send_rows_c[r * D + g];
            p->recv_rows[r] += p->recv_rows_c[r * D + g];
        }
        p->n_send += p->send_rows[r];
        p->n_recv += p->recv_rows[r];
    }
    if (p->n_recv > max_recv)
        INFMOE_FAIL("%lld rows arrive for this rank's experts or units, more than the %lld planned",
                    (long long)p->n_recv, (long long)max_recv);
    p->rstart[0] = 0;
    for (int g = 0; g < D; g++) {
        p->rstart[g + 1] = p->rstart[g];
        for (int r = 0; r < P; r++) p->rstart[g + 1] += p->recv_rows_c[r * D + g];
    }
    post_out(p, send, recv, width, elem);
    return p->n_recv;
}

void dispatch_forward_start(dispatch_plan *p, const void *send, void *recv, int width, size_t elem) {
    if (p->chunks == 1) dispatch_forward(p, send, recv, width, elem);
    else post_out(p, send, recv, width, elem);
}

void dispatch_wait_out(dispatch_plan *p, int chunk) {
    if (p->chunks > 1) MPI_CHECK(MPI_Wait(&p->flight[0].req[chunk], MPI_STATUS_IGNORE));
}

void dispatch_reverse_chunk(dispatch_plan *p, int chunk, const void *back, void *out, int width,
                            size_t elem) {
    if (p->chunks == 1) dispatch_reverse(p, back, out, width, elem);
    else post_chunk(p, 1, chunk, back, out, width, elem);
}

void dispatch_wait_back(dispatch_plan *p) {
    if (p->chunks > 1) MPI_CHECK(MPI_Waitall(p->chunks, p->flight[1].req, MPI_STATUSES_IGNORE));
}

void dispatch_progress(dispatch_plan *p) {
    if (p->chunks == 1) return;
    int flag;
    for (int d = 0; d < 2; d++) MPI_CHECK(MPI_Testall(p->chunks, p->flight[d].req, &flag, MPI_STATUSES_IGNORE));
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

void dispatch_group_by_id_range(dispatch_groups *g, const int32_t *bucket, int64_t r0, int64_t r1,
                                int b0, int b1) {
    ALWAYS(r1 <= g->cap && 0 <= b0 && b0 <= b1 && b1 <= g->n_buckets);
    const int nb = b1 - b0;
    int32_t *rel = xmalloc(sizeof(int32_t) * (size_t)(r1 > r0 ? r1 - r0 : 1));
    for (int64_t i = r0; i < r1; i++) {
        ALWAYS(bucket[i] >= b0 && bucket[i] < b1);
        rel[i - r0] = bucket[i] - b0;
    }
    int64_t *start = xmalloc(sizeof(int64_t) * ((size_t)nb + 1));
    sort_by_bucket(rel, r1 - r0, nb, start, NULL, g->row + r0);
    for (int b = 0; b <= nb; b++) g->start[b0 + b] = r0 + start[b];
    for (int64_t i = r0; i < r1; i++) g->row[i] += (int32_t)r0;
    free(start);
    free(rel);
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

/*
 * Rows repeat in idx (a token's choices add into its one row), so threads split
 * the columns, not the rows: each element still gets its additions in row order,
 * the same sums for any thread count.
 */
enum { SCATTER_COLS = 64 };

/* rows of src as fp32 (f32) or bf16 (h16, f32 NULL) */
static void scatter_add_rows(float *dst, int64_t dst_stride, const float *f32, const bf16 *h16,
                             const int32_t *idx, int64_t n, int width) {
#pragma omp parallel for if (n * width > (1 << 15))
    for (int c0 = 0; c0 < width; c0 += SCATTER_COLS) {
        int c1 = c0 + SCATTER_COLS < width ? c0 + SCATTER_COLS : width;
        for (int64_t r = 0; r < n; r++) {
            float *o = dst + (int64_t)idx[r] * dst_stride;
            if (f32) {
                const float *y = f32 + r * width;
#pragma omp simd
                for (int c = c0; c < c1; c++) o[c] += y[c];
            } else {
                const bf16 *y = h16 + r * width;
#pragma omp simd
                for (int c = c0; c < c1; c++) o[c] += bf16_float(y[c]);
            }
        }
    }
}

void dispatch_scatter_add(float *dst, int64_t dst_stride, const float *src, const int32_t *idx,
                          int64_t n, int width) {
    scatter_add_rows(dst, dst_stride, src, NULL, idx, n, width);
}

void dispatch_scatter_add_bf16(float *dst, int64_t dst_stride, const bf16 *src, const int32_t *idx,
                               int64_t n, int width) {
    scatter_add_rows(dst, dst_stride, NULL, src, idx, n, width);
}
