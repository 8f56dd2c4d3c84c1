/* dist: MPI initialisation, communicators, checked collectives, rank-0 log (see dist.h). */
#define _GNU_SOURCE
#include "infmoe/dist.h"

#include <malloc.h>
#include <limits.h>
#include <stdarg.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/util.h"

static int g_rank = 0;
static FILE *g_log = NULL;

static void abort_all(int status) { MPI_Abort(MPI_COMM_WORLD, status); }

/* Every rank reached the same error: leave MPI together, no abort needed. */
static void finalize_quietly(void) {
    infmoe_abort_hook = NULL;
    infmoe_exit_hook = NULL;
    MPI_Finalize();
}

void mpi_check_at(int rc, const char *call, const char *file, int line) {
    if (rc == MPI_SUCCESS) return;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    infmoe_fail_at(file, line, "MPI call failed: %s: %s", call, msg);
}

void dist_init(dist_ctx *d, int *argc, char ***argv) {
    memset(d, 0, sizeof *d);
    /*
     * Keep freed memory in the process: Open MPI allocates a temporary buffer
     * for every large reduction, and handing it back to the kernel each time
     * means faulting in fresh pages (10-20 us per 4 KiB here) every step. This
     * made the 0.5 GB gradient allreduce of GPT-2 small 4-5x slower.
     */
    mallopt(M_MMAP_MAX, 0);
    mallopt(M_TRIM_THRESHOLD, INT_MAX);
    /*
     * Open MPI's "lockedfile" shared-file-pointer component overflows a fixed
     * buffer (and aborts) on file paths over about 220 characters; infmoe uses
     * no shared file pointers, so leave it out unless the user chose otherwise.
     */
    setenv("OMPI_MCA_sharedfp", "^lockedfile", 0);
    int provided;
    /* past a file-size limit (ulimit -f) writes fail with EFBIG, reported in one line,
     * instead of the default SIGXFSZ killing the process */
    signal(SIGXFSZ, SIG_IGN);
    MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
    /* Errors come back as codes so MPI_CHECK can say where they happened. */
    MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
    MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &d->rank));
    MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &d->size));
    d->world = MPI_COMM_WORLD;
    g_rank = d->rank;
    if (d->size > 1) infmoe_rank_for_messages = d->rank;
    infmoe_abort_hook = abort_all;
    infmoe_exit_hook = finalize_quietly;
    infmoe_quiet_rank = d->rank != 0;
    /* Threads compute, only the main thread calls MPI (progress calls between GEMMs
     * included): an MPI built without that level would be unsafe even so. */
    if (provided < MPI_THREAD_FUNNELED)
        infmoe_die_all("this MPI library gives thread level %d, below MPI_THREAD_FUNNELED (%d), "
                       "which infmoe's OpenMP threads need; use an MPI built with thread support",
                       provided, MPI_THREAD_FUNNELED);
    dist_set_layout(d, 1);
}

void dist_set_layout(dist_ctx *d, int ep) {
    ALWAYS(ep >= 1 && d->size % ep == 0);
    if (d->ep_comm && d->ep_comm != MPI_COMM_NULL) MPI_CHECK(MPI_Comm_free(&d->ep_comm));
    if (d->edp_comm && d->edp_comm != MPI_COMM_NULL) MPI_CHECK(MPI_Comm_free(&d->edp_comm));
    d->ep = ep;
    /* Groups of `ep` consecutive ranks; the same position across groups forms edp. */
    MPI_CHECK(MPI_Comm_split(d->world, d->rank / ep, d->rank % ep, &d->ep_comm));
    MPI_CHECK(MPI_Comm_split(d->world, d->rank % ep, d->rank / ep, &d->edp_comm));
    MPI_CHECK(MPI_Comm_rank(d->ep_comm, &d->ep_rank));
    MPI_CHECK(MPI_Comm_rank(d->edp_comm, &d->edp_rank));
    MPI_CHECK(MPI_Comm_size(d->edp_comm, &d->edp_size));
}

void dist_finalize(dist_ctx *d) {
    if (d->ep_comm != MPI_COMM_NULL) MPI_CHECK(MPI_Comm_free(&d->ep_comm));
    if (d->edp_comm != MPI_COMM_NULL) MPI_CHECK(MPI_Comm_free(&d->edp_comm));
    dist_log_close();
    infmoe_abort_hook = NULL;
    infmoe_exit_hook = NULL;
    MPI_CHECK(MPI_Finalize());
}

void dist_exit_if_error(const dist_ctx *d, const char *err) {
    int mine = err[0] ? d->rank : d->size, first = mine;
    MPI_CHECK(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, d->world));
    if (first == d->size) return;
    if (d->rank == first) fprintf(stderr, "infmoe: %s\n", err);
    infmoe_exit(1);
}

void dist_allreduce_mean(float *buf, size_t n, MPI_Comm comm) {
    int size;
    MPI_CHECK(MPI_Comm_size(comm, &size));
    if (size == 1) return;
    /* MPI counts are int: reduce in pieces of at most 1 GiB of floats. */
    for (size_t off = 0; off < n; off += (size_t)1 << 28) {
        size_t len = n - off < ((size_t)1 << 28) ? n - off : ((size_t)1 << 28);
        MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, buf + off, (int)len, MPI_FLOAT, MPI_SUM, comm));
    }
    float inv = 1.0f / (float)size;
    for (size_t i = 0; i < n; i++) buf[i] *= inv;
}

void dist_allreduce_sum_d(double *buf, int n, MPI_Comm comm) {
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, buf, n, MPI_DOUBLE, MPI_SUM, comm));
}

void dist_allreduce_max_d(double *buf, int n, MPI_Comm comm) {
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, buf, n, MPI_DOUBLE, MPI_MAX, comm));
}

void dist_log_open(FILE *f) { g_log = f; }

void dist_log(const char *fmt, ...) {
    if (g_rank != 0) return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stdout, fmt, ap);
    va_end(ap);
    fflush(stdout);
    if (g_log) {
        va_start(ap, fmt);
        vfprintf(g_log, fmt, ap);
        va_end(ap);
        fflush(g_log);
    }
}

void dist_log_close(void) {
    if (g_log) fclose(g_log);
    g_log = NULL;
}
