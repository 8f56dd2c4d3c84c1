/*
 * dispatch: moving token rows to the ranks that hold their experts, and back.
 *
 * A row is `width` floats: a token's vector plus whatever the caller packs
 * beside it (expert id, unit blocks and weights). The sender groups its rows by
 * destination rank; dispatch_plan() exchanges the per-destination row counts with
 * MPI_Alltoall, and those counts are the single source of truth for every later
 * size. dispatch_forward() sends the rows (MPI_Alltoallv); dispatch_reverse()
 * sends rows of any width back along the same plan, so each sender receives
 * exactly one row per row it sent, in its own order. Every rank calls every
 * collective, with zero-length segments where it has nothing to send.
 */
#ifndef INFMOE_DISPATCH_H
#define INFMOE_DISPATCH_H

#include <mpi.h>
#include <stdint.h>

typedef struct {
    MPI_Comm comm;
    int size;
    int *send_rows, *recv_rows;     /* per peer, from the last plan */
    int *scount, *sdispl, *rcount, *rdispl; /* in floats, for the current width */
    int64_t n_send, n_recv;         /* total rows */
} dispatch_plan;

void dispatch_init(dispatch_plan *p, MPI_Comm comm);
void dispatch_free(dispatch_plan *p);
/* Exchange how many rows go to each peer (send_rows[peer]); fills recv_rows and n_recv. */
void dispatch_exchange_counts(dispatch_plan *p, const int *send_rows);
/* send (n_send, width) grouped by destination -> recv (n_recv, width) grouped by source. */
void dispatch_forward(dispatch_plan *p, const float *send, float *recv, int width);
/* The way back: back (n_recv, width) in received order -> out (n_send, width) in sent order. */
void dispatch_reverse(dispatch_plan *p, const float *back, float *out, int width);

#endif
