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
#include "infmoe/util.h"
#include "layer_case.h"

static rng_state g_rng;

/* Router, noise and expert weights ~ N(0, 0.6^2), N(0, 0.3^2), N(0, 0.3^2). */
static void moe_params(layer_case *lc) {
    for (int t = 0; t < lc->tab.n; t++) {
        const tensor_spec *s = &lc->tab.t[t];
        float scale = strstr(s->name, "router") ? 0.6f : 0.3f;
        for (size_t i = 0; i < s->numel; i++) lc->params[s->offset + i] = scale * rng_normal(&g_rng);
    }
}

static void setup(layer_case *lc, run_config *cfg, int64_t n) {
    layer_case_setup(lc, cfg, n, (ffn_context){MPI_COMM_WORLD, MPI_COMM_WORLD, 1, 1, 0, 77, 3, 10, 0, 1, 0, NULL},
                     moe_params, &g_rng);
}

/* At least 4 probes per tensor, and no more than a quarter as many skipped. */
static int enough(int checked, int skipped) { return checked >= 4 && skipped * 4 <= checked; }

static void check_gradients(const char *name, run_config *cfg) {
    layer_case lc;
    setup(&lc, cfg, 12);
    layer_case_check_gradients(name, &lc, 60, 1, enough);
    layer_case_free(&lc);
}

static void check_reference(const char *name, run_config *cfg) {
    layer_case lc;
    setup(&lc, cfg, 40);
    char what[128];
    snprintf(what, sizeof what, "%s: grouped GEMMs vs per-token reference", name);
    layer_case_check_reference(what, &lc, 1e-4, 1e-5);
    layer_case_free(&lc);
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
        layer_case_objective(&lc);
        stats_row row;
        ffn_stats_row(&lc.f, &row);
        int64_t got = row.tokens[0];
        CHECK(got == want[step], "collapse guard, step %d: expert 0 got %lld tokens, expected %lld",
              step, (long long)got, (long long)want[step]);
        ffn_end_step(&lc.f, &lc.ctx);
    }
    layer_case_free(&lc);
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
