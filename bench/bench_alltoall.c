/*
 * bench_alltoall: the MoE token exchange, flat against node-aware
 * (dispatch.h), at several message sizes, on the ranks and nodes it is started
 * on (bench/alltoall_nodes.sh starts it on namespace nodes):
 *   mpirun -np P bench_alltoall [--width C] [--rows R1,R2,...] [--reps N] [--bf16]
 * Every rank sends R rows of C elements to every rank of MPI_COMM_WORLD (an
 * expert group of P ranks), forward and back, as a layer's forward does; the
 * median over reps of the slowest rank's time per exchange pair is printed per
 * R for both schemes, with their ratio, then an allreduce of the gradient size
 * given by --allreduce FLOATS (default 8M) for scale.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/dispatch.h"
#include "infmoe/dist.h"
#include "infmoe/util.h"

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median over reps of the slowest rank's seconds for one forward + reverse. */
static double time_pair(dispatch_plan *p, const void *send, void *recv, void *back, int width, size_t elem,
                        int reps, int64_t cap) {
    double *t = xcalloc((size_t)reps, sizeof(double));
    for (int i = 0; i < reps + 1; i++) { /* the first is a warm-up */
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        int64_t n = dispatch_send(p, send, recv, width, elem, cap);
        (void)n;
        dispatch_reverse(p, recv, back, width, elem);
        double dt = MPI_Wtime() - t0, worst;
        MPI_Allreduce(&dt, &worst, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        if (i > 0) t[i - 1] = worst;
    }
    qsort(t, (size_t)reps, sizeof(double), cmp_double);
    double med = t[reps / 2];
    free(t);
    return med;
}

int main(int argc, char **argv) {
    dist_ctx d;
    dist_init(&d, &argc, &argv);
    int width = 768, reps = 20, bf = 0;
    long ar_floats = 8L << 20;
    const char *rows_list = "1,4,16,64,256";
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--width") == 0 && i + 1 < argc) width = atoi(argv[++i]);
        else if (strcmp(argv[i], "--rows") == 0 && i + 1 < argc) rows_list = argv[++i];
        else if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc) reps = atoi(argv[++i]);
        else if (strcmp(argv[i], "--allreduce") == 0 && i + 1 < argc) ar_floats = atol(argv[++i]);
        else if (strcmp(argv[i], "--bf16") == 0) bf = 1;
        else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            if (d.rank == 0)
                printf("usage: mpirun -np P bench_alltoall [--width C] [--rows R1,R2,...] [--reps N] [--bf16] "
                       "[--allreduce FLOATS]\n");
            dist_finalize(&d);
            return 0;
        } else {
            if (d.rank == 0) fprintf(stderr, "bench_alltoall: unknown option '%s' (see --help)\n", argv[i]);
            dist_finalize(&d);
            return 2;
        }
    }
    if (width < 1 || reps < 1) infmoe_die_all("--width and --reps must be positive");
    const size_t elem = bf ? 2 : 4;
    dispatch_plan flat, node;
    dispatch_init(&flat, MPI_COMM_WORLD, 0);
    dispatch_init(&node, MPI_COMM_WORLD, 1);
    if (d.rank == 0)
        printf("all-to-all, %d ranks, rows of %d %s elements (%zu bytes), forward + back, median of %d "
               "(slowest rank)\n", d.size, width, bf ? "bf16" : "fp32", width * elem, reps);
    char list[256];
    snprintf(list, sizeof list, "%s", rows_list);
    for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
        int R = atoi(tok);
        if (R < 1) infmoe_die_all("--rows takes positive counts, not '%s'", tok);
        int64_t n = (int64_t)R * d.size;
        int32_t *bucket = xcalloc((size_t)n, sizeof(int32_t));
        for (int64_t i = 0; i < n; i++) bucket[i] = (int32_t)(i % d.size);
        int32_t *item = xcalloc((size_t)n, sizeof(int32_t));
        dispatch_order(&flat, bucket, n, d.size, 1, NULL, item);
        dispatch_order(&node, bucket, n, d.size, 1, NULL, item);
        char *send = xcalloc((size_t)n, width * elem), *recv = xcalloc((size_t)n, width * elem),
             *back = xcalloc((size_t)n, width * elem);
        double tf = time_pair(&flat, send, recv, back, width, elem, reps, n);
        double tn = time_pair(&node, send, recv, back, width, elem, reps, n);
        if (d.rank == 0)
            printf("  %5d rows a peer (%8.1f KiB a message): flat %9.3f ms | node-aware %9.3f ms | node / flat %.3f\n",
                   R, R * width * elem / 1024.0, 1e3 * tf, 1e3 * tn, tn / tf);
        free(bucket), free(item), free(send), free(recv), free(back);
    }
    if (ar_floats > 0) {
        float *g = xcalloc((size_t)ar_floats, sizeof(float));
        double best = 1e30;
        for (int i = 0; i < 3; i++) {
            MPI_Barrier(MPI_COMM_WORLD);
            double t0 = MPI_Wtime();
            MPI_Allreduce(MPI_IN_PLACE, g, (int)ar_floats, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
            double dt = MPI_Wtime() - t0;
            best = dt < best ? dt : best;
        }
        if (d.rank == 0)
            printf("  allreduce of %ld floats (%.1f MiB): %.3f ms (best of 3)\n", ar_floats, ar_floats * 4.0 / (1 << 20),
                   1e3 * best);
        free(g);
    }
    dispatch_free(&flat);
    dispatch_free(&node);
    dist_finalize(&d);
    return 0;
}
