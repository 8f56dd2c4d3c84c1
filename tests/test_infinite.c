/*
 * ∞-MoE layer on one rank (MPI, ep = 1):
 *  - the block-sparse path equals the masked dense reference (every unit computed,
 *    multiplied by its weight) for mask_block 1, 16 and 64, both mask rules, K = 1, 2, 3;
 *  - finite-difference gradients of the output (and the KL aux loss) with respect
 *    to the input, the router MLP (mu and sigma heads), the learned scores P and q,
 *    and the unit weights, for both mask rules with fixed noise (K = 2).
 * Probes whose perturbation changes a kept block are skipped and counted.
 */
#include <mpi.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "infmoe/gemm.h"
#include "infmoe/infinite.h"
#include "infmoe/util.h"

typedef struct {
    inf_layer *f;
    tensor_table tab;
    float *params, *grads, *in, *out, *R;
    int64_t n;
    int C;
    ffn_context ctx;
} lcase;

static rng_state g_rng;

static double objective(lcase *c) {
    memset(c->out, 0, sizeof(float) * c->n * c->C);
    double aux = inf_forward(c->f, c->params, c->out, c->in, c->n, &c->ctx);
    double s = 0.0;
    for (int64_t i = 0; i < c->n * c->C; i++) s += (double)c->out[i] * c->R[i];
    return s + aux;
}

static run_config base(int H, int block, mask_rule mask, int K) {
    run_config c;
    config_defaults(&c);
    c.n_embd = 8;
    c.ffn_kind = FFN_INFINITE;
    c.inf_units = H;
    c.mask_block = block;
    c.mask = mask;
    c.latent_dim = mask == MASK_WINDOW ? 1 : 3;
    c.samples = K;
    c.keep = 0.25f;
    c.router_hidden = 6;
    c.tau = 0.5f;
    return c;
}

static void setup(lcase *c, const run_config *cfg, int64_t n) {
    memset(c, 0, sizeof *c);
    c->n = n;
    c->C = cfg->n_embd;
    c->f = inf_create(cfg, 0, &c->tab, n, 1, 0);
    inf_register_units(c->f, &c->tab);
    c->params = xcalloc(c->tab.total, sizeof(float));
    c->grads = xcalloc(c->tab.total, sizeof(float));
    tensor_init_values(&c->tab, c->params, 9);
    for (int t = 0; t < c->tab.n; t++) { /* non-zero biases, larger sigma */
        const tensor_spec *s = &c->tab.t[t];
        float add = strstr(s->name, "sigma.b") ? -1.0f : 0.0f;
        for (size_t i = 0; i < s->numel; i++) c->params[s->offset + i] += add + 0.1f * rng_normal(&g_rng);
    }
    c->in = xcalloc((size_t)(n * c->C), sizeof(float));
    c->out = xcalloc((size_t)(n * c->C), sizeof(float));
    c->R = xcalloc((size_t)(n * c->C), sizeof(float));
    for (int64_t i = 0; i < n * c->C; i++) {
        c->in[i] = rng_normal(&g_rng);
        c->R[i] = rng_normal(&g_rng);
    }
    c->ctx = (ffn_context){MPI_COMM_WORLD, MPI_COMM_WORLD, 1, 1, 0, 11, 4, 10, 0, 1};
}

static void teardown(lcase *c) {
    inf_free(c->f);
    tensor_table_free(&c->tab);
    free(c->params);
    free(c->grads);
    free(c->in);
    free(c->out);
    free(c->R);
}

static void check_reference(const char *name, run_config cfg) {
    lcase c;
    setup(&c, &cfg, 24);
    objective(&c);
    float *ref = xcalloc((size_t)(c.n * c.C), sizeof(float));
    inf_reference_forward(c.f, c.params, ref, c.in, c.n);
    char what[160];
    snprintf(what, sizeof what, "%s: block-sparse vs masked dense", name);
    check_arrays_close(what, c.out, ref, c.n * c.C, 1e-4, 1e-5);
    free(ref);
    teardown(&c);
}

static void fd_probe(const char *what, lcase *c, float *x, const float *grad, size_t count) {
    objective(c);
    uint64_t base = inf_routing_hash(c->f);
    int checked = 0, skipped = 0, bad = 0;
    size_t stride = count > 50 ? count / 50 : 1;
    for (size_t i = 0; i < count; i += stride) {
        float keep = x[i];
        double up = 0, down = 0, h = 1e-3;
        int same = 0;
        /* a smaller step when the first crosses a block boundary (z moves with mu) */
        for (int attempt = 0; attempt < 3 && !same; attempt++, h /= 4) {
            x[i] = keep + (float)h;
            up = objective(c);
            same = inf_routing_hash(c->f) == base;
            x[i] = keep - (float)h;
            down = objective(c);
            same &= inf_routing_hash(c->f) == base;
            x[i] = keep;
        }
        h *= 4;
        if (!same) {
            skipped++;
            continue;
        }
        checked++;
        double fd = (up - down) / (2.0 * h);
        if (!close_enough(grad[i], fd, 3e-2, 3e-3)) {
            if (bad < 3) fprintf(stderr, "  %s[%zu]: analytic %.6g, finite difference %.6g\n", what, i, grad[i], fd);
            bad++;
        }
    }
    CHECK(bad == 0, "%s: %d of %d probes differ", what, bad, checked);
    CHECK(checked >= 1 && skipped <= checked + 2, "%s: %d checked, %d skipped (routing changed)", what, checked, skipped);
}

static void check_gradients(const char *name, run_config cfg) {
    lcase c;
    setup(&c, &cfg, 10);
    float *din = xcalloc((size_t)(c.n * c.C), sizeof(float));
    objective(&c);
    inf_backward(c.f, c.params, c.grads, din, c.R, c.in, c.n, &c.ctx);
    char what[160];
    snprintf(what, sizeof what, "%s d/d input", name);
    fd_probe(what, &c, c.in, din, (size_t)(c.n * c.C));
    for (int t = 0; t < c.tab.n; t++) {
        const tensor_spec *s = &c.tab.t[t];
        snprintf(what, sizeof what, "%s d/d %s", name, s->name);
        fd_probe(what, &c, c.params + s->offset, c.grads + s->offset, s->numel);
    }
    free(din);
    teardown(&c);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    rng_seed(&g_rng, 21);
    check_reference("window, block 1, K 2", base(32, 1, MASK_WINDOW, 2));
    check_reference("window, block 16, K 2", base(128, 16, MASK_WINDOW, 2));
    check_reference("window, block 64, K 3", base(512, 64, MASK_WINDOW, 3));
    check_reference("learned, block 1, K 1", base(32, 1, MASK_LEARNED, 1));
    check_reference("learned, block 16, K 2", base(128, 16, MASK_LEARNED, 2));
    check_reference("learned, block 64, K 2", base(512, 64, MASK_LEARNED, 2));
    run_config c = base(32, 1, MASK_WINDOW, 2);
    c.kl_weight = 0.5f;
    check_gradients("window (per unit, K 2, KL)", c);
    c = base(64, 4, MASK_WINDOW, 2);
    check_gradients("window (blocks of 4, K 2)", c);
    c = base(32, 1, MASK_LEARNED, 2);
    c.kl_weight = 0.5f;
    check_gradients("learned (per unit, K 2, KL)", c);
    c = base(64, 4, MASK_LEARNED, 2);
    check_gradients("learned (blocks of 4, K 2)", c);
    gemm_shutdown();
    int rc = check_finish("infinite: block-sparse equals masked dense; router, sampling, both mask rules against finite differences");
    MPI_Finalize();
    return rc;
}
