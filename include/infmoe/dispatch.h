/*
 * dispatch: moving token rows to the ranks that hold their experts, grouping
 * them there by bucket (an expert, or a chunk of ∞-MoE units), and back.
 *
 * A row is `width` elements of `elem` bytes, fp32 (4) or bf16 (2, train.precision
 * bf16: half the bytes): a token's vector plus whatever the caller packs beside
 * it (the expert's index, a token's samples z). One exchange:
 *   dispatch_order    the send order: items (a token's choice of an expert, a
 *                     token's need of a shard) sorted by bucket, hence by
 *                     destination rank, and the per-destination row counts
 *   dispatch_send     counts by MPI_Alltoall (the single source of truth for every
 *                     later size), then the rows by MPI_Alltoallv
 *   dispatch_group_*  on the receiver: the received rows of each bucket (an
 *                     expert, or a chunk of ∞-MoE units), for the GEMMs
 *   dispatch_gather / dispatch_scatter(_add)
 *                     rows between received order and grouped order
 *   dispatch_reverse  rows of any width back along the same plan, so each sender
 *                     receives exactly one row per row it sent, in its own order
 *   dispatch_forward  more rows (gradients) along the plan, the same way as the first
 * Every rank calls every collective, with zero-length segments where it has
 * nothing to send. The rows go by one MPI_Alltoallv (flat), or node-aware in
 * two stages (parallel.alltoall: node): within each node, rank l gathers the
 * rows its node sends to local rank l of every node; then one exchange per node
 * pair among the ranks of equal local index; each receiver unpacks into the
 * flat exchange's layout, so the result is the same bytes. A layer makes its plan when it is created and reuses it
 * every step; the routing math (which bucket, what a row carries) stays with
 * the layer.
 */
#ifndef INFMOE_DISPATCH_H
#define INFMOE_DISPATCH_H

#include <mpi.h>
#include <stdint.h>

/* The node-aware exchange's layout: ranks of comm as (node, local index). */
typedef struct {
    MPI_Comm node, cross; /* this node's ranks; the ranks of this local index, by node */
    int n_nodes, per_node, node_id, local;
    int *global;          /* (n_nodes, per_node): the comm rank of (node, local) */
    int *sub, *rsub;      /* (per_node, n_nodes) element counts of stage 1, sent and received */
    int *c1, *d1, *rc1, *rd1, *c2, *d2, *rc2, *rd2; /* Alltoallv counts of both stages */
    char *buf[2];         /* packing buffers (grown as needed) */
    size_t cap[2];
} dispatch_nodes;

/* One direction of a chunked exchange in flight: counts, displacements and a
 * request per chunk (an MPI_Ialltoallv's arrays must stay put until it ends). */
typedef struct {
    int *count, *displ, *rcount, *rdispl; /* (chunks, size) elements */
    MPI_Request *req;                     /* (chunks) */
} dispatch_flight;

typedef struct {
    MPI_Comm comm;
    int size;
    dispatch_nodes *nodes;          /* NULL: the flat exchange */
    /* chunks (parallel.alltoall_chunks): a rank's buckets in `chunks` groups of
     * consecutive ones, each group's rows in an exchange of its own */
    int chunks, buckets_per_rank;
    int *send_rows_c, *recv_rows_c; /* (size, chunks) rows per peer and chunk */
    int64_t *rstart;                /* (chunks + 1) first received row of each chunk */
    dispatch_flight flight[2];      /* out (to the buckets) and back */
    int *send_rows, *recv_rows;     /* per peer: of the last dispatch_order, of its dispatch_send */
    int *scount, *sdispl, *rcount, *rdispl; /* in elements, for the current width */
    int64_t n_send, n_recv;         /* total rows */
} dispatch_plan;

/* A plan over comm; MPI_COMM_NULL gives a plan that can never exchange (a model
 * built for its tensor table only). node_aware: the two-stage exchange over the
 * nodes MPI_Comm_split_type(SHARED) finds (collective over comm); flat where the
 * nodes hold unequal numbers of ranks of comm, with one note from comm's rank 0. */
void dispatch_init(dispatch_plan *p, MPI_Comm comm, int node_aware);
/* The same with the nodes given: node_comm holds this rank's node's ranks of comm
 * (a split of comm; tests group ranks into nodes this way on one machine). */
void dispatch_init_nodes(dispatch_plan *p, MPI_Comm comm, MPI_Comm node_comm);
void dispatch_free(dispatch_plan *p);
/*
 * The send order of one exchange. Items (a token's choice of an expert, a
 * token's need of a shard) come in token order, each with the bucket it goes
 * to, or -1 when it is not sent; bucket b lives on rank b / buckets_per_rank.
 * Send rows are grouped by bucket, hence by destination, in item order within
 * a bucket (a stable counting sort). Fills slot[i], the send row of item i (-1:
 * not sent; slot may be NULL), item[r], the item of send row r, and the
 * per-destination counts of the plan; returns the number of send rows.
 */
int64_t dispatch_order(dispatch_plan *p, const int32_t *bucket, int64_t n_items, int n_buckets,
                       int buckets_per_rank, int32_t *slot, int32_t *item);
/*
 * Exchange the counts of the last dispatch_order, then send (n_send, width) ->
 * recv (n_recv, width), grouped by source rank. Returns n_recv; more than
 * max_recv rows (what the receiver allocated for) is an internal error.
 */
int64_t dispatch_send(dispatch_plan *p, const void *send, void *recv, int width, size_t elem,
                      int64_t max_recv);
/* Rows of any width along the plan of the last dispatch_send, again: send -> recv. */
void dispatch_forward(dispatch_plan *p, const void *send, void *recv, int width, size_t elem);
/* The way back: back (n_recv, width) in received order -> out (n_send, width) in sent order. */
void dispatch_reverse(dispatch_plan *p, const void *back, void *out, int width, size_t elem);
/*
 * Chunked exchanges, pipelined with the receivers' work (parallel.alltoall_chunks,
 * Tutel's overlap degree). dispatch_set_chunks(p, D) splits each rank's buckets into
 * D groups of consecutive buckets (chunk g: local buckets [g B / D, (g + 1) B / D)),
 * before the plan's first dispatch_order. Chunk g's rows go by an MPI_Ialltoallv of
 * their own and arrive chunk by chunk: received rows are ordered by chunk, then by
 * source rank, then in send order, so chunk g holds received rows [rstart[g],
 * rstart[g + 1]); with D = 1 that is the order of dispatch_send, and the exchanges
 * below are dispatch_send/forward/reverse themselves (node-aware included). Every
 * bucket's rows are those of the unchunked exchange in the same order, so work
 * done per bucket gives the same bits for any D.
 *   dispatch_send_start / dispatch_forward_start  post every chunk's exchange out
 *   dispatch_wait_out(p, g)                       chunk g has arrived
 *   dispatch_reverse_chunk(p, g, ...)             post chunk g's rows back
 *   dispatch_wait_back(p)                         every chunk is back
 *   dispatch_progress(p)                          let MPI move the posted ones
 *                                                 (call between GEMMs; main thread)
 */
void dispatch_set_chunks(dispatch_plan *p, int chunks);
int64_t dispatch_send_start(dispatch_plan *p, const void *send, void *recv, int width, size_t elem,
                            int64_t max_recv);
void dispatch_forward_start(dispatch_plan *p, const void *send, void *recv, int width, size_t elem);
void dispatch_wait_out(dispatch_plan *p, int chunk);
void dispatch_reverse_chunk(dispatch_plan *p, int chunk, const void *back, void *out, int width,
                            size_t elem);
void dispatch_wait_back(dispatch_plan *p);
void dispatch_progress(dispatch_plan *p);
/* The local buckets [*lo, *hi) of chunk g. */
void dispatch_chunk_buckets(const dispatch_plan *p, int chunk, int *lo, int *hi);

/*
 * The exchange probe (benchmarks; off by default): with it on, every blocking
 * exchange (one chunk) starts with an MPI_Barrier over its ranks, so the time in
 * the barrier is this rank waiting for the last one to arrive and the time in
 * the exchange after it is the rows moving. dispatch_probe_times: this process's
 * seconds of each so far. Not for chunked plans (set the probe before any
 * dispatch_set_chunks > 1); a barrier costs a few microseconds on one node.
 */
void dispatch_set_probe(int on);
void dispatch_probe_times(double *wait, double *move);
/* Bytes of rows this process has sent through every exchange so far (tests, benchmarks). */
int64_t dispatch_bytes_sent(void);

/*
 * Received rows grouped by bucket: positions [start[b], start[b+1]) hold bucket
 * b's rows, row[pos] the received row at each position, ascending within a
 * bucket. A row may belong to several buckets (flags) or to exactly one (ids).
 */
typedef struct {
    int n_buckets;
    int64_t cap;   /* positions allocated */
    int64_t *start; /* (n_buckets + 1) */
    int32_t *row;   /* (cap) */
} dispatch_groups;

void dispatch_groups_init(dispatch_groups *g, int n_buckets, int64_t cap);
void dispatch_groups_free(dispatch_groups *g);
/* bucket (n_rows): each row's bucket in [0, n_buckets). */
void dispatch_group_by_id(dispatch_groups *g, const int32_t *bucket, int64_t n_rows);
/* The same for rows [r0, r1) only, whose buckets are [b0, b1) and whose positions
 * are [r0, r1) (a chunk's rows): start[b0..b1] and row[r0..r1) are set as
 * dispatch_group_by_id over all rows would set them. */
void dispatch_group_by_id_range(dispatch_groups *g, const int32_t *bucket, int64_t r0, int64_t r1,
                                int b0, int b1);
/* member (n_rows, n_buckets): nonzero where the row belongs to the bucket. */
void dispatch_group_by_flags(dispatch_groups *g, const uint8_t *member, int64_t n_rows);

/* dst (n, width) = src rows idx[r] (rows src_stride elements apart), elements of elem bytes. */
void dispatch_gather(void *dst, const void *src, int64_t src_stride, const int32_t *idx,
                     int64_t n, int width, size_t elem);
/* dst rows idx[r] (dst_stride apart) = src (n, width); idx must not repeat. */
void dispatch_scatter(void *dst, int64_t dst_stride, const void *src, const int32_t *idx,
                      int64_t n, int width, size_t elem);
/* dst rows idx[r] += src (n, width), in order r = 0, 1, ... (idx may repeat). */
void dispatch_scatter_add(float *dst, int64_t dst_stride, const float *src, const int32_t *idx,
                          int64_t n, int width);
/* The same from bf16 rows, each value widened to fp32 before it is added. */
void dispatch_scatter_add_bf16(float *dst, int64_t dst_stride, const uint16_t *src,
                               const int32_t *idx, int64_t n, int width);

#endif
