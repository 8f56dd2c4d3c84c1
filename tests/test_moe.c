/*
 * MoE layer on one rank (MPI, ep = 1):
 *  - the grouped oneDNN expert GEMMs equal the naive per-token reference;
 *  - finite-difference gradients of the layer's output and of its aux losses with
 *    respect to the input, the router (and noise) weights and the experts, for
 *    noisy top-k with importance and load losses, Switch with its aux loss,
 *    z-loss and jitter, the capacity/dropping path, and the MoGE penalty.
 * Noise and jitter are drawn from (seed, step, token), so they are fixed across
 * the perturbed forwards; probes whose perturbation changes the routing (a
 * discontinuity) are skipped and counted.
 */
#include <mpi.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "infmoe/gemm.h"
#include "infmoe/moe.h"
#include "infmoe/util.h"

typedef struct {
    moe_layer *m;
    tensor_table tab;
    float *params, *grads, *in, *out, *R;
    int64_t n;
    int C;
    ffn_context ctx;
} layer_case;

static rng_state g_rng;

static double objective(layer_case *lc) {
    memset(lc->out, 0, sizeof(float) * lc->n * lc->C);
    double aux = moe_forward(lc->m, lc->params, lc->out, lc->in, lc->n, &lc->ctx);
    double s = 0.0;
    for (int64_t i = 0; i < lc->n * lc->C; i++) s += (double)lc->out[i] * lc->R[i];
    return s + aux; /* the objective moe_backward differentiates, with dout = R */
}

static void setup(layer_case *lc, run_config *cfg, int64_t n) {
    memset(lc, 0, sizeof *lc);
    lc->n = n;
    lc->C = cfg->n_embd;
    lc->m = moe_create(cfg, 0, &lc->tab, n, 1, 0);
    moe_register_experts(lc->m, &lc->tab);
    lc->params = xcalloc(lc->tab.total, sizeof(float));
    lc->grads = xcalloc(lc->tab.total, sizeof(float));
    for (int t = 0; t < lc->tab.n; t++) {
        const tensor_spec *s = &lc->tab.t[t];
        float scale = strstr(s->name, "router") ? 0.6f : strstr(s->name, "noise") ? 0.3f : 0.3f;
        for (size_t i = 0; i < s->numel; i++)
            lc->params[s->offset + i] = scale * rng_normal(&g_rng);
    }
    lc->in = xcalloc((size_t)(n * lc->C), sizeof(float));
    lc->out = xcalloc((size_t)(n * lc->C), sizeof(float));
    lc->R = xcalloc((size_t)(n * lc->C), sizeof(float));
    for (int64_t i = 0; i < n * lc->C; i++) {
        lc->in[i] = rng_normal(&g_rng);
        lc->R[i] = rng_normal(&g_rng);
    }
    lc->ctx = (ffn_context){MPI_COMM_WORLD, MPI_COMM_WORLD, 1, 1, 0, 77, 3, 10, 0, 1};
}

static void teardown(layer_case *lc) {
    moe_free(lc->m);
    tensor_table_free(&lc->tab);
    free(lc->params);
    free(lc->grads);
    free(lc->in);
    free(lc->out);
    free(lc->R);
}

/* Analytic gradients of the objective; returns d/d input in din. */
static void analytic(layer_case *lc, float *din) {
    objective(lc);
    memset(lc->grads, 0, sizeof(float) * lc->tab.total);
    memset(din, 0, sizeof(float) * lc->n * lc->C);
    moe_backward(lc->m, lc->params, lc->grads, din, lc->R, lc->in, lc->n, &lc->ctx);
}

/* Central differences of up to `max_probe` entries of x against grad. */
static void fd_probe(const char *what, layer_case *lc, float *x, const float *grad, size_t count,
                     int max_probe) {
    objective(lc);
    uint64_t base = moe_routing_hash(lc->m);
    int checked = 0, skipped = 0, bad = 0;
    size_t stride = count > (size_t)max_probe ? count / max_probe : 1;
    for (size_t i = 0; i < count; i += stride) {
        float keep = x[i];
        const float h = 1e-3f;
        x[i] = keep + h;
        double up = objective(lc);
        int same = moe_routing_hash(lc->m) == base;
        x[i] = keep - h;
        double down = objective(lc);
        same &= moe_routing_hash(lc->m) == base;
        x[i] = keep;
        if (!same) {
            skipped++;
            continue;
        }
        double fd = (up - down) / (2.0 * h);
        checked++;
        if (!close_enough(grad[i], fd, 3e-2, 3e-3)) {
            if (bad < 3) fprintf(stderr, "  %s[%zu]: analytic %.6g, finite difference %.6g\n", what, i, grad[i], fd);
            bad++;
        }
    }
    CHECK(bad == 0, "%s: %d of %d probes differ", what, bad, checked);
    CHECK(checked >= 4 && skipped * 4 <= checked, "%s: %d probes checked, %d skipped (routing changed)",
          what, checked, skipped);
}

static void check_gradients(const char *name, run_config *cfg) {
    layer_case lc;
    setup(&lc, cfg, 12);
    float *din = xcalloc((size_t)(lc.n * lc.C), sizeof(float));
    analytic(&lc, din);
    char what[160];
    snprintf(what, sizeof what, "%s d/d input", name);
    fd_probe(what, &lc, lc.in, din, (size_t)(lc.n * lc.C), 60);
    for (int t = 0; t < lc.tab.n; t++) {
        const tensor_spec *s = &lc.tab.t[t];
        snprintf(what, sizeof what, "%s d/d %s", name, s->name);
        fd_probe(what, &lc, lc.params + s->offset, lc.grads + s->offset, s->numel, 60);
    }
    free(din);
    teardown(&lc);
}

static void check_reference(const char *name, run_config *cfg) {
    layer_case lc;
    setup(&lc, cfg, 40);
    objective(&lc);
    float *ref = xcalloc((size_t)(lc.n * lc.C), sizeof(float));
    moe_reference_forward(lc.m, lc.params, ref, lc.in, lc.n);
    char what[128];
    snprintf(what, sizeof what, "%s: grouped GEMMs vs per-token reference", name);
    check_arrays_close(what, lc.out, ref, lc.n * lc.C, 1e-4, 1e-5);
    free(ref);
    teardown(&lc);
}

/*
 * Eigen's guard: a router that always ranks expert 0 first. After a step, an
 * expert whose running total exceeds the mean by more than the margin is
 * blocked for the next step; once blocked, the totals even out and it is
 * routed to again. So with every token on expert 0 at step 0 (16 of 32
 * assignments), the guard alternates: 16, 0, 16, 0 tokens in steps 0-3, and
 * after the guard's 4 steps expert 0 takes every token again.
 */
static void check_collapse_guard(run_config *cfg) {
    layer_case lc;
    cfg->collapse_guard_steps = 4;
    setup(&lc, cfg, 16);
    const tensor_spec *r = tensor_find(&lc.tab, "h.0.moe.router.w");
    for (size_t i = 0; i < r->numel; i++) lc.params[r->offset + i] = 0.0f;
    for (int64_t t = 0; t < lc.n; t++) lc.in[t * lc.C] = 5.0f + (float)t; /* channel 0 > 0 */
    lc.params[r->offset] = 10.0f; /* expert 0's logit: 10 x channel 0, the largest */
    const int64_t want[6] = {16, 0, 16, 0, 16, 16};
    for (int step = 0; step < 6; step++) {
        lc.ctx.step = step;
        objective(&lc);
        int64_t got = moe_get_stats(lc.m)->tokens[0];
        CHECK(got == want[step], "collapse guard, step %d: expert 0 got %lld tokens, expected %lld",
              step, (long long)got, (long long)want[step]);
        moe_end_step(lc.m, &lc.ctx);
    }
    teardown(&lc);
}

static run_config base_config(void) {
    run_config c;
    config_defaults(&c);
    c.n_embd = 8;
    c.ffn_kind = FFN_TOPK;
    c.experts = 4;
    c.top_k = 2;
    c.expert_hidden = 6;
    c.w_importance = 0;
    c.w_load = 0;
    c.aux_alpha = 0;
    c.z_loss = 0;
    return c;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    rng_seed(&g_rng, 5);
    run_config c = base_config();

    /* grouped GEMMs against the naive reference */
    check_reference("noisy top-2", &c);
    c.capacity_factor = 0.6f;
    check_reference("noisy top-2, capacity 0.6", &c);
    c = base_config();
    c.gate = GATE_SWITCH;
    c.top_k = 1;
    c.jitter = 0.05f;
    check_reference("switch top-1", &c);

    /* gradients of the output path (no aux) */
    c = base_config();
    check_gradients("noisy top-2 output", &c);
    c.capacity_factor = 0.6f;
    check_gradients("noisy top-2 with dropping", &c);
    c = base_config();
    c.gate = GATE_SWITCH;
    c.top_k = 1;
    c.jitter = 0.05f;
    check_gradients("switch top-1 output with jitter", &c);
    c.top_k = 2;
    c.capacity_factor = 0.8f;
    check_gradients("switch top-2 with capacity", &c);

    /* each aux loss, weighted up so that its gradient dominates the objective */
    c = base_config();
    c.w_importance = 50.0f;
    check_gradients("importance loss", &c);
    c = base_config();
    c.w_load = 50.0f;
    check_gradients("load loss", &c);
    c = base_config();
    c.z_loss = 5.0f;
    check_gradients("z-loss (noisy gate)", &c);
    c = base_config();
    c.gate = GATE_SWITCH;
    c.top_k = 1;
    c.aux_alpha = 20.0f;
    c.z_loss = 2.0f;
    c.jitter = 0.05f;
    check_gradients("switch aux + z-loss", &c);
    c = base_config();
    c.ffn_kind = FFN_MOGE;
    c.experts = 8;
    c.moge_lambda = 30.0f;
    check_gradients("moge penalty, 8 experts (2x4 map, 2x2 window)", &c);
    c.experts = 16;
    check_gradients("moge penalty, 16 experts (4x4 map, 3x3 window)", &c);

    c = base_config();
    check_collapse_guard(&c);

    gemm_shutdown();
    int rc = check_finish("moe: grouped GEMMs equal the reference; gates, aux losses, capacity and moge against finite differences; collapse guard");
    MPI_Finalize();
    return rc;
}
