/*
 * check: the few assertions the C tests share. A test program calls CHECK and
 * CHECK_CLOSE; each failure prints where and why; check_finish() prints
 * "PASS name" or "FAIL name" and returns the exit status for main.
 */
#ifndef INFMOE_TESTS_CHECK_H
#define INFMOE_TESTS_CHECK_H

#include <math.h>
#include <stdio.h>

#include "infmoe/config.h"

static int check_failures __attribute__((unused)) = 0;

#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        if (!(cond)) {                                                        \
            check_failures++;                                                 \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                     \
            fprintf(stderr, "\n");                                            \
        }                                                                     \
    } while (0)

/* |got - want| <= atol + rtol * |want| */
static inline int close_enough(double got, double want, double rtol, double atol) {
    return fabs(got - want) <= atol + rtol * fabs(want) && !isnan(got);
}

/* Max error of got vs want over n values, reported and counted on failure. */
static inline int check_arrays_close(const char *what, const float *got, const float *want,
                                     long n, double rtol, double atol) {
    long bad = 0, worst = -1;
    double worst_err = 0;
    for (long i = 0; i < n; i++) {
        double err = fabs((double)got[i] - (double)want[i]);
        if (!close_enough(got[i], want[i], rtol, atol)) {
            bad++;
            if (worst < 0 || err > worst_err || isnan(got[i])) { worst = i; worst_err = err; }
        }
    }
    if (bad) {
        check_failures++;
        fprintf(stderr, "  %s: %ld of %ld values differ; worst at %ld: got %.8g want %.8g\n", what,
                bad, n, worst, got[worst], want[worst]);
    }
    return bad == 0;
}

static inline int check_finish(const char *name) {
    printf("%s %s\n", check_failures ? "FAIL" : "PASS", name);
    return check_failures ? 1 : 0;
}

/* The model tests' backbone: the config defaults with two layers of these shapes. */
static inline void tiny_backbone(run_config *c, int n_embd, int n_head, int seq_len, int vocab_size) {
    c->n_layer = 2;
    c->n_embd = n_embd;
    c->n_head = n_head;
    c->seq_len = seq_len;
    c->vocab_size = vocab_size;
}

#endif
