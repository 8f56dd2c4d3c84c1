/*
 * layer_case: one FFN layer of any variant driven through the ffn interface
 * (ffn_forward / ffn_backward) on one rank, for the layer tests: the objective
 * sum(out * R) + aux that ffn_backward differentiates with dout = R, analytic
 * gradients, central finite differences that skip probes whose perturbation
 * changed the routing (ffn_routing_hash), and the naive reference forward.
 */
#ifndef INFMOE_TESTS_LAYER_CASE_H
#define INFMOE_TESTS_LAYER_CASE_H

#include <mpi.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "infmoe/ffn.h"
#include "infmoe/util.h"

typedef struct {
    ffn_layer f;
    tensor_table tab;
    float *params, *grads, *in, *out, *R, *din, *scratch;
    int64_t n;
    int C;
    ffn_context ctx;
} layer_case;

/*
 * Layer 0 of cfg's kind for n tokens, on one rank with context ctx (world and
 * ep comms are MPI_COMM_WORLD). init_params fills lc->params (its tensors are in
 * lc->tab); then the input and R are drawn from rng, alternately.
 */
static inline void layer_case_setup(layer_case *lc, const run_config *cfg, int64_t n, ffn_context ctx,
                                    void (*init_params)(layer_case *lc), rng_state *rng) {
    memset(lc, 0, sizeof *lc);
    lc->n = n;
    lc->C = cfg->n_embd;
    lc->ctx = ctx;
    ffn_init(&lc->f, cfg, 0, &lc->tab, n, &lc->ctx);
    ffn_register_sharded(&lc->f, &lc->tab);
    lc->params = xcalloc(lc->tab.total, sizeof(float));
    lc->grads = xcalloc(lc->tab.total, sizeof(float));
    init_params(lc);
    lc->in = xcalloc((size_t)(n * lc->C), sizeof(float));
    lc->out = xcalloc((size_t)(n * lc->C), sizeof(float));
    lc->R = xcalloc((size_t)(n * lc->C), sizeof(float));
    lc->din = xcalloc((size_t)(n * lc->C), sizeof(float));
    lc->scratch = xcalloc(ffn_scratch_floats(&lc->f, n) + 1, sizeof(float));
    for (int64_t i = 0; i < n * lc->C; i++) {
        lc->in[i] = rng_normal(rng);
        lc->R[i] = rng_normal(rng);
    }
}

static inline void layer_case_free(layer_case *lc) {
    ffn_free(&lc->f);
    tensor_table_free(&lc->tab);
    float *bufs[] = {lc->params, lc->grads, lc->in, lc->out, lc->R, lc->din, lc->scratch};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) free(bufs[i]);
}

/* out = FFN(in); returns sum(out * R) + aux. */
static inline double layer_case_objective(layer_case *lc) {
    memset(lc->out, 0, sizeof(float) * (size_t)(lc->n * lc->C));
    double aux = ffn_forward(&lc->f, lc->params, lc->out, lc->in, lc->n, &lc->ctx);
    double s = 0.0;
    for (int64_t i = 0; i < lc->n * lc->C; i++) s += (double)lc->out[i] * lc->R[i];
    return s + aux;
}

/* The objective's analytic gradients: lc->grads and d/d input in lc->din. */
static inline void layer_case_backward(layer_case *lc) {
    layer_case_objective(lc);
    memset(lc->grads, 0, sizeof(float) * lc->tab.total);
    memset(lc->din, 0, sizeof(float) * (size_t)(lc->n * lc->C));
    ffn_backward(&lc->f, lc->params, lc->grads, lc->din, lc->R, lc->in, lc->n, lc->scratch, &lc->ctx);
}

/*
 * Central differences (step 1e-3) of about max_probe entries of x (count of them)
 * against grad, within 3e-2 relative + 3e-3 absolute. A probe whose step changes
 * the routing is retried with the step divided by 4, up to `attempts` steps in
 * all, and then skipped; *checked and *skipped count them. Differences are counted
 * as check failures (the first three printed).
 */
static inline void layer_case_fd(const char *what, layer_case *lc, float *x, const float *grad,
                                 size_t count, int max_probe, int attempts, int *checked, int *skipped) {
    layer_case_objective(lc);
    uint64_t base = ffn_routing_hash(&lc->f);
    int bad = 0;
    *checked = *skipped = 0;
    size_t stride = count > (size_t)max_probe ? count / (size_t)max_probe : 1;
    for (size_t i = 0; i < count; i += stride) {
        float keep = x[i];
        double up = 0, down = 0, h = 1e-3;
        int same = 0;
        for (int attempt = 0; attempt < attempts && !same; attempt++, h /= 4) {
            x[i] = keep + (float)h;
            up = layer_case_objective(lc);
            same = ffn_routing_hash(&lc->f) == base;
            x[i] = keep - (float)h;
            down = layer_case_objective(lc);
            same &= ffn_routing_hash(&lc->f) == base;
            x[i] = keep;
        }
        h *= 4;
        if (!same) {
            (*skipped)++;
            continue;
        }
        (*checked)++;
        double fd = (up - down) / (2.0 * h);
        if (!close_enough(grad[i], fd, 3e-2, 3e-3)) {
            if (bad < 3) fprintf(stderr, "  %s[%zu]: analytic %.6g, finite difference %.6g\n", what, i, grad[i], fd);
            bad++;
        }
    }
    CHECK(bad == 0, "%s: %d of %d probes differ", what, bad, *checked);
}

/*
 * Finite differences of the input and of every tensor of the layer. accept says
 * whether a tensor's (checked, skipped) counts are enough probes.
 */
static inline void layer_case_check_gradients(const char *name, layer_case *lc, int max_probe, int attempts,
                                              int (*accept)(int checked, int skipped)) {
    layer_case_backward(lc);
    float *din = xcalloc((size_t)(lc->n * lc->C), sizeof(float)), *grads = xcalloc(lc->tab.total, sizeof(float));
    memcpy(din, lc->din, sizeof(float) * (size_t)(lc->n * lc->C));
    memcpy(grads, lc->grads, sizeof(float) * lc->tab.total);
    char what[160];
    int checked, skipped;
    snprintf(what, sizeof what, "%s d/d input", name);
    layer_case_fd(what, lc, lc->in, din, (size_t)(lc->n * lc->C), max_probe, attempts, &checked, &skipped);
    CHECK(accept(checked, skipped), "%s: %d probes checked, %d skipped (routing changed)", what, checked, skipped);
    for (int t = 0; t < lc->tab.n; t++) {
        const tensor_spec *s = &lc->tab.t[t];
        snprintf(what, sizeof what, "%s d/d %s", name, s->name);
        layer_case_fd(what, lc, lc->params + s->offset, grads + s->offset, s->numel, max_probe, attempts,
                      &checked, &skipped);
        CHECK(accept(checked, skipped), "%s: %d probes checked, %d skipped (routing changed)", what, checked,
              skipped);
    }
    free(din);
    free(grads);
}

/* The layer's output against ffn_reference_forward under the same routing. */
static inline void layer_case_check_reference(const char *what, layer_case *lc, double rtol, double atol) {
    layer_case_objective(lc);
    float *ref = xcalloc((size_t)(lc->n * lc->C), sizeof(float));
    ffn_reference_forward(&lc->f, lc->params, ref, lc->in, lc->n);
    check_arrays_close(what, lc->out, ref, lc->n * lc->C, rtol, atol);
    free(ref);
}

#endif
