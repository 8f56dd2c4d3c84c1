/* dispatch: the all-to-all exchange of token rows (see dispatch.h). */
#include "infmoe/dispatch.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/dist.h"
#include "infmoe/util.h"

void dispatch_init(dispatch_plan *p, MPI_Comm comm) {
    memset(p, 0, sizeof *p);
    p->comm = comm;
    MPI_CHECK(MPI_Comm_size(comm, &p->size));
    size_t n = (size_t)p->size;
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

void dispatch_exchange_counts(dispatch_plan *p, const int *send_rows) {
    memcpy(p->send_rows, send_rows, (size_t)p->size * sizeof(int));
    MPI_CHECK(MPI_Alltoall(p->send_rows, 1, MPI_INT, p->recv_rows, 1, MPI_INT, p->comm));
    p->n_send = p->n_recv = 0;
    for (int r = 0; r < p->size; r++) {
        p->n_send += p->send_rows[r];
        p->n_recv += p->recv_rows[r];
    }
}

/* Float counts and displacements for rows of `width` (MPI counts are int). */
static void set_counts(int *count, int *displ, const int *rows, int size, int width) {
    int64_t off = 0;
    for (int r = 0; r < size; r++) {
        int64_t c = (int64_t)rows[r] * width;
        if (c > INT_MAX || off > INT_MAX)
            INFMOE_FAIL("dispatch of %lld floats exceeds MPI's int counts", (long long)(off + c));
        count[r] = (int)c;
        displ[r] = (int)off;
        off += c;
    }
}

void dispatch_forward(dispatch_plan *p, const float *send, float *recv, int width) {
    set_counts(p->scount, p->sdispl, p->send_rows, p->size, width);
    set_counts(p->rcount, p->rdispl, p->recv_rows, p->size, width);
    MPI_CHECK(MPI_Alltoallv(send, p->scount, p->sdispl, MPI_FLOAT, recv, p->rcount, p->rdispl,
                            MPI_FLOAT, p->comm));
}

void dispatch_reverse(dispatch_plan *p, const float *back, float *out, int width) {
    set_counts(p->scount, p->sdispl, p->send_rows, p->size, width);
    set_counts(p->rcount, p->rdispl, p->recv_rows, p->size, width);
    MPI_CHECK(MPI_Alltoallv(back, p->rcount, p->rdispl, MPI_FLOAT, out, p->scount, p->sdispl,
                            MPI_FLOAT, p->comm));
}
