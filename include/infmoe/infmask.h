/*
 * infmask: which units one ∞-MoE sample keeps, and with what weight (the
 * masks of docs/infinite.md). From a sample z it gives the kb kept blocks of
 * b units out of nb (N% of the H units), and the softmax weights over the kept
 * units with, for backward, d unit logit / d z:
 *   window   the arc of blocks nearest z on a ring of the units (dz = 1); logits
 *            -(distance to z, in units of the arc)^2 / tau^2
 *   learned  the blocks with the best mean score P z + q; the scores are the logits
 * Every rank computes a mask from z with the same arithmetic, so the owner of a
 * token and the shards holding its units agree on it exactly.
 */
#ifndef INFMOE_INFMASK_H
#define INFMOE_INFMASK_H

#include <stddef.h>
#include <stdint.h>

#include "infmoe/config.h"

typedef struct {
    mask_rule rule;
    int H, b, nb, kb, n_keep, dz; /* units, block size, blocks, kept blocks, kb * b, latent dim */
    float tau;
    size_t P, q;                  /* learned rule: offsets of the scores' weights (H,dz) and bias (H) */
} inf_mask;

/* Scratch for computing one sample's mask (one per OpenMP thread). */
typedef struct {
    float *scores;   /* (H) unit scores (learned rule) */
    int32_t *blocks; /* (kb) kept blocks, ascending */
    float *p;        /* (kb*b) softmax over the kept units, in block order */
    float *dedz;     /* (kb*b*dz) d unit logit / d z */
    float *key;      /* (nb) selection keys */
    float *grad_pq;  /* (H*dz + H) learned rule: a thread's d/dP and d/dq (NULL for window) */
    float max, inv;  /* the softmax's largest logit and 1 / its sum, from INF_MASK_WEIGHTS on */
    void *mem;
} mask_scratch;

void inf_mask_scratch_init(const inf_mask *m, mask_scratch *s);
void inf_mask_scratch_free(mask_scratch *s);

/* What inf_mask_sample computes: the kept blocks only, also their units' weights, or also d/dz. */
enum { INF_MASK_BLOCKS, INF_MASK_WEIGHTS, INF_MASK_DEDZ };

/*
 * One sample's mask from z (dz values): s->blocks (ascending), and from
 * INF_MASK_WEIGHTS on s->p, the softmax over the kept units (block order), with
 * INF_MASK_DEDZ s->dedz, d unit logit / d z per unit.
 */
void inf_mask_sample(const inf_mask *m, const float *params, const float *z, mask_scratch *s,
                     int want);

/*
 * Window rule on a shard: the kept blocks as inf_mask_sample finds them, and p
 * and d/dz of only the kept blocks j with local_of[j] >= 0, from the whole
 * arc's max and inv (s->max, s->inv of the owner's inf_mask_sample): the same
 * values inf_mask_sample gives those units, at the cost of the shard's part of
 * the arc. The other blocks' p and dedz are left as they were.
 */
void inf_mask_window_part(const inf_mask *m, const float *z, float max, float inv,
                          const int32_t *local_of, mask_scratch *s);
/* Window rule: Q = sum over all kept units of p de/dz, after inf_mask_sample (INF_MASK_DEDZ). */
float inf_mask_window_q(const inf_mask *m, const mask_scratch *s);

#endif
