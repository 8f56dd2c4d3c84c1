/*
 * gradreduce: the gradient reduction over a communicator, in buckets that can
 * be started while backward still runs, with a result that does not depend on
 * timing, on the bucket size or on MPI's choice of algorithm.
 *
 * A segment of a float buffer (one layer's gradients, say) is queued with
 * gradred_add; it is cut into buckets of at most bucket_floats floats. Each
 * bucket is cut into P pieces, one per rank of the communicator (P ranks), and
 * goes through two non-blocking exchanges:
 *
 *   1. every rank sends piece q to rank q (MPI_Isend/Irecv);
 *   2. rank r, holding all P copies of piece r, adds them in rank order
 *      ((g_0 + g_1) + g_2) + ... + g_{P-1}, multiplies by the segment's scale,
 *      and sends the result to every other rank.
 *
 * Each element is therefore summed in the same order (rank 0 first) whatever
 * the bucket it falls in, whether the reduction ran behind backward or after
 * it, and whichever rank finished first: the blocking and the overlapped
 * reduction agree bit for bit, and with 2 ranks both equal MPI_Allreduce's sum
 * (a + b is commutative in IEEE arithmetic). The bytes moved are those of a
 * ring allreduce, 2 (P-1)/P of the segment per rank, in P-1 messages per
 * bucket and phase instead of a ring's steps.
 *
 * MPI moves these messages only inside MPI calls (Open MPI has no progress
 * thread): gradred_progress, called between the GEMMs of backward, tests the
 * buckets in flight, does the sums of those whose pieces have arrived and
 * starts the second exchange. At most `slots` buckets are in flight (each owns
 * (P-1) pieces of receive space); later ones wait in order and start as slots
 * free up. Every rank must queue the same segments in the same order.
 *
 * Not thread-safe: call from the thread that calls MPI (MPI_THREAD_FUNNELED).
 */
#ifndef INFMOE_GRADREDUCE_H
#define INFMOE_GRADREDUCE_H

#include <mpi.h>
#include <stddef.h>

typedef struct grad_reducer grad_reducer;

/*
 * A reducer over `comm` (duplicated, so its messages never meet others'), for
 * buckets of at most bucket_floats floats, at most `slots` of them in flight.
 */
grad_reducer *gradred_create(MPI_Comm comm, size_t bucket_floats, int slots);
/*
 * Queue buf[0, n): replaced, once done, by the rank-order sum over the ranks
 * times scale. The buffer must not be touched until gradred_wait returns.
 * Starts as many queued buckets as there are free slots.
 */
void gradred_add(grad_reducer *r, float *buf, size_t n, float scale);
/* Advance what is in flight without blocking; start queued buckets in freed slots. */
void gradred_progress(grad_reducer *r);
/* Finish every queued segment. */
void gradred_wait(grad_reducer *r);
/* Waits for what is in flight, then frees; NULL is fine. */
void gradred_free(grad_reducer *r);

#endif
