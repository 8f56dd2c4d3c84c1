/*
 * dist: MPI for the rest of infmoe. Initialisation, the communicators of the
 * parallel layout (world; ep = expert groups of consecutive ranks; edp = the
 * same shard across groups), checked collectives, and logging from rank 0.
 *
 * Every MPI call goes through MPI_CHECK, so a failure names the call, the
 * source line and the rank instead of hanging or aborting silently.
 */
#ifndef INFMOE_DIST_H
#define INFMOE_DIST_H

#include <mpi.h>
#include <stddef.h>
#include <stdio.h>

typedef struct {
    int rank, size;    /* in MPI_COMM_WORLD */
    int ep, ep_rank;   /* expert group size and this rank's place in it */
    int edp_size, edp_rank;
    MPI_Comm world, ep_comm, edp_comm;
} dist_ctx;

/* MPI_Init_thread (funneled) and error-handler setup; sets the rank for messages. */
void dist_init(dist_ctx *d, int *argc, char ***argv);
/* Build the ep and edp communicators for `ep` ranks per expert group (ep | size). */
void dist_set_layout(dist_ctx *d, int ep);
void dist_finalize(dist_ctx *d);

void mpi_check_at(int rc, const char *call, const char *file, int line);
#define MPI_CHECK(call) mpi_check_at((call), #call, __FILE__, __LINE__)

/*
 * An error some ranks may meet and others not (a file only rank 0 writes, a
 * part of a checkpoint only one rank reads): every rank passes its message
 * ("" for none); if any has one, the lowest such rank prints it and every rank
 * finalises MPI and exits with status 1 (no abort banner). Collective.
 */
void dist_exit_if_error(const dist_ctx *d, const char *err);

/* In-place mean of a float buffer over the ranks of `comm`. */
void dist_allreduce_mean(float *buf, size_t n, MPI_Comm comm);
/* Sum of doubles over `comm`, in place. */
void dist_allreduce_sum_d(double *buf, int n, MPI_Comm comm);
/* Maximum of doubles over `comm`, in place. */
void dist_allreduce_max_d(double *buf, int n, MPI_Comm comm);

/*
 * Logging: printf-like, rank 0 only, to stdout and (once dist_log_open has
 * been given rank 0's open train.log) to that copy of the log, which
 * dist_log_close closes. Flushed on every line.
 */
void dist_log_open(FILE *f);
void dist_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void dist_log_close(void);

#endif
