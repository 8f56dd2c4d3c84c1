/*
 * The node-aware all-to-all against the flat one (MPI, any rank count): ranks
 * are grouped into "nodes" by a split of MPI_COMM_WORLD (argv[1] ranks a node,
 * blocks of consecutive ranks, or with argv[2] = "strided" rank % nodes), each
 * rank sends a random number of rows (zero included) of random bytes to every
 * rank, fp32-sized and bf16-sized elements, and the rows that arrive, forward,
 * reverse and a second forward, must be the flat exchange's byte for byte.
 * Prints PASS, or the first difference; with unequal nodes the plan falls back
 * to the flat exchange (a note) and the rows are again the same. Passes 2 and 3
 * run with the exchange probe on (a barrier before each exchange, timed): the
 * same bytes, and the probe's clocks move only while it is on.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/dispatch.h"
#include "infmoe/dist.h"
#include "infmoe/util.h"

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    int per = argc > 1 ? atoi(argv[1]) : 2;
    int strided = argc > 2 && strcmp(argv[2], "strided") == 0;
    if (per < 1) per = 1;
    int n_nodes = (size + per - 1) / per;
    MPI_Comm node;
    MPI_Comm_split(MPI_COMM_WORLD, strided ? rank % n_nodes : rank / per, rank, &node);
    int bad = 0;
    for (int pass = 0; pass < 4 && !bad; pass++) {
        const size_t elem = pass % 2 ? sizeof(uint16_t) : sizeof(float);
        double w0, m0, w1, m1;
        dispatch_set_probe(pass >= 2);
        dispatch_probe_times(&w0, &m0);
        const int width = 5 + pass;
        rng_state r;
        rng_seed(&r, 1000 + (uint64_t)rank * 7 + (uint64_t)pass);
        /* items: each goes to bucket b (one bucket a rank), some left out */
        int64_t n_items = 3 + (int64_t)(rng_u64(&r) % 40);
        int32_t *bucket = xcalloc((size_t)n_items, sizeof(int32_t));
        for (int64_t i = 0; i < n_items; i++) {
            uint64_t v = rng_u64(&r) % (uint64_t)(size + 1);
            bucket[i] = v == (uint64_t)size || (pass == 2 && (int)v == (rank + 1) % size) ? -1 : (int32_t)v;
        }
        dispatch_plan flat, nodes;
        dispatch_init(&flat, MPI_COMM_WORLD, 0);
        dispatch_init_nodes(&nodes, MPI_COMM_WORLD, node);
        int32_t *slot = xcalloc((size_t)n_items, sizeof(int32_t)), *item = xcalloc((size_t)n_items, sizeof(int32_t));
        int64_t n_send = dispatch_order(&flat, bucket, n_items, size, 1, slot, item);
        dispatch_order(&nodes, bucket, n_items, size, 1, slot, item);
        size_t row = (size_t)width * elem, cap = (size_t)size * 64;
        unsigned char *send = xcalloc((size_t)n_send + 1, row);
        for (size_t b = 0; b < (size_t)n_send * row; b++) send[b] = (unsigned char)rng_u64(&r);
        unsigned char *ra = xcalloc(cap, row), *rb = xcalloc(cap, row);
        int64_t na = dispatch_send(&flat, send, ra, width, elem, (int64_t)cap);
        int64_t nb = dispatch_send(&nodes, send, rb, width, elem, (int64_t)cap);
        if (na != nb || memcmp(ra, rb, (size_t)na * row) != 0) {
            printf("rank %d pass %d: forward rows differ (%lld vs %lld rows)\n", rank, pass, (long long)na,
                   (long long)nb);
            bad = 1;
        }
        /* back: each received row altered, then returned to its sender */
        for (size_t b = 0; b < (size_t)na * row; b++) ra[b] = rb[b] = (unsigned char)(ra[b] ^ (b * 31u));
        unsigned char *oa = xcalloc((size_t)n_send + 1, row), *ob = xcalloc((size_t)n_send + 1, row);
        dispatch_reverse(&flat, ra, oa, width, elem);
        dispatch_reverse(&nodes, rb, ob, width, elem);
        if (!bad && memcmp(oa, ob, (size_t)n_send * row) != 0) {
            printf("rank %d pass %d: reverse rows differ\n", rank, pass);
            bad = 1;
        }
        /* a second, wider exchange along the same plan */
        unsigned char *wa = xcalloc(cap, 2 * row), *wb = xcalloc(cap, 2 * row), *ws = xcalloc((size_t)n_send + 1, 2 * row);
        for (size_t b = 0; b < (size_t)n_send * 2 * row; b++) ws[b] = (unsigned char)(b * 7u + (size_t)rank);
        dispatch_forward(&flat, ws, wa, 2 * width, elem);
        dispatch_forward(&nodes, ws, wb, 2 * width, elem);
        if (!bad && memcmp(wa, wb, (size_t)na * 2 * row) != 0) {
            printf("rank %d pass %d: second forward rows differ\n", rank, pass);
            bad = 1;
        }
        dispatch_probe_times(&w1, &m1);
        if (!bad && (pass >= 2 ? !(w1 >= w0 && m1 > m0) : (w1 != w0 || m1 != m0))) {
            printf("rank %d pass %d: the probe's clocks %s\n", rank, pass,
                   pass >= 2 ? "did not move with the probe on" : "moved with the probe off");
            bad = 1;
        }
        free(wa), free(wb), free(ws), free(oa), free(ob), free(ra), free(rb), free(send), free(slot), free(item),
            free(bucket);
        dispatch_free(&flat);
        dispatch_free(&nodes);
        /* every rank leaves together: a failure on one rank must not leave the others
         * in the next pass's collectives */
        MPI_Allreduce(MPI_IN_PLACE, &bad, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    }
    int any = 0;
    MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (rank == 0 && !any)
        printf("PASS dispatch: node-aware all-to-all equals the flat one byte for byte, with and without the "
               "exchange probe (%d ranks, %s nodes of %d)\n",
               size, strided ? "strided" : "consecutive", per);
    MPI_Comm_free(&node);
    MPI_Finalize();
    return any;
}
