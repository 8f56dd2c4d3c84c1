/*
 * optim: AdamW with decoupled weight decay, the warmup + cosine learning-rate
 * schedule, and global-norm gradient clipping.
 *
 *   lr(s) = lr * (s+1)/warmup                                  for s < warmup
 *         = min_lr + (lr - min_lr) * (1 + cos(pi * d)) / 2     d = (s-warmup)/(steps-warmup)
 *   clip:  g *= grad_clip / (norm + 1e-6) when norm > grad_clip (grad_clip 0: off)
 *   AdamW: m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  t = s + 1
 *          p -= lr * (m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + wd * p)   (wd only where decay)
 */
#ifndef INFMOE_OPTIM_H
#define INFMOE_OPTIM_H

#include <stddef.h>

#include "infmoe/bf16.h"
#include "infmoe/config.h"
#include "infmoe/tensor.h"

/* Learning rate of step `step` (0-based) under cfg's schedule. */
float optim_lr(const run_config *cfg, int step);

/* Sum of squares of a buffer, in double. */
double optim_sum_squares(const float *g, size_t n);

/* The factor clipping multiplies gradients by (1 when not clipping). */
float optim_clip_scale(float grad_clip, double norm);

/*
 * One AdamW step (step is 0-based) over every tensor of `tab`; gradients are
 * multiplied by grad_scale first (clipping). params_h, when not NULL, receives the
 * updated parameters rounded to bf16 in the same pass (the bf16 weights of a bf16 run).
 */
void optim_adamw_step(const tensor_table *tab, float *params, const float *grads, float *m,
                      float *v, const run_config *cfg, float lr, int step, float grad_scale,
                      bf16 *params_h);

#endif
