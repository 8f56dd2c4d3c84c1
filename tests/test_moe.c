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
#include <math.h>
#include <mpi.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "infmoe/gemm.h"
#include "infmoe/moe.h"
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

/* Gradients with the expert bias set (it moves the choices and the load loss's thresholds). */
static void check_gradients_biased(const char *name, run_config *cfg) {
    layer_case lc;
    setup(&lc, cfg, 12);
    double *bias = moe_expert_bias(lc.f.moe);
    for (int e = 0; e < cfg->experts; e++) bias[e] = 0.4 * ((e % 3) - 1);
    layer_case_check_gradients(name, &lc, 60, 1, enough);
    layer_case_free(&lc);
}

/*
 * Aux-loss-free balancing: the update moves each expert's bias by the rate towards
 * even load (sign of mean - count, 0 at the mean), and a bias changes the choices
 * but not the gates: with every token's router preferring expert 0, a large bias
 * against it sends every token elsewhere.
 */
static void check_expert_bias(run_config *cfg) {
    double bias[4] = {0.0, 0.5, -0.25, 1.0};
    const double chosen[4] = {10, 2, 4, 0}; /* mean 4 */
    moe_bias_update(bias, chosen, 4, 0.01);
    CHECK(bias[0] == 0.0 - 0.01 && bias[1] == 0.5 + 0.01 && bias[2] == -0.25 && bias[3] == 1.0 + 0.01,
          "expert bias update: got %g %g %g %g", bias[0], bias[1], bias[2], bias[3]);
    layer_case lc;
    cfg->expert_bias_rate = 0.1f;
    cfg->gate = GATE_SWITCH;
    cfg->top_k = 1;
    setup(&lc, cfg, 16);
    const tensor_spec *r = tensor_find(&lc.tab, "h.0.moe.router.w");
    for (size_t i = 0; i < r->numel; i++) lc.params[r->offset + i] = 0.0f;
    for (int64_t t = 0; t < lc.n; t++) lc.in[t * lc.C] = 1.0f + 0.1f * (float)t;
    lc.params[r->offset] = 1.0f; /* expert 0's logit is channel 0, the largest */
    layer_case_objective(&lc);
    stats_row row;
    ffn_stats_row(&lc.f, &row);
    CHECK(row.tokens[0] == 16, "expert bias 0: expert 0 takes every token (got %lld)", (long long)row.tokens[0]);
    float g0[16];
    for (int t = 0; t < 16; t++) g0[t] = lc.out[t * lc.C]; /* not a gate, but moves with it */
    double *bias_now = moe_expert_bias(lc.f.moe);
    bias_now[0] = -100.0;
    layer_case_objective(&lc);
    ffn_stats_row(&lc.f, &row);
    CHECK(row.tokens[0] == 0 && row.bias && row.bias[0] == -100.0,
          "expert bias -100 on expert 0: it takes no token (got %lld)", (long long)row.tokens[0]);
    int moved = 0;
    for (int t = 0; t < 16; t++) moved += lc.out[t * lc.C] != g0[t];
    CHECK(moved > 0, "expert bias: the choice moved, so the output did");
    /* end of step: expert 0 (no tokens) gains the rate, the one that took them all loses it */
    int busiest = 0;
    for (int e = 1; e < cfg->experts; e++)
        if (row.tokens[e] > row.tokens[busiest]) busiest = e;
    double before = bias_now[busiest];
    ffn_end_step(&lc.f, &lc.ctx);
    CHECK(bias_now[0] == -100.0 + (double)0.1f && bias_now[busiest] == before - (double)0.1f,
          "expert bias after the step: %g (expected %g), busiest %g (expected %g)", bias_now[0],
          -100.0 + (double)0.1f, bias_now[busiest], before - (double)0.1f);
    layer_case_free(&lc);
}

/*
 * The load loss sees the biased selection: with a bias of +100 on experts 0 and 1
 * (k = 2), they are always chosen and 2, 3 never, under any noise, so the load
 * vector is (n, n, 0, 0) and its squared coefficient of variation exactly 1.
 */
static void check_bias_load(run_config *cfg) {
    layer_case lc;
    cfg->expert_bias_rate = 0.01f;
    cfg->w_load = 1.0f;
    setup(&lc, cfg, 16);
    double *bias = moe_expert_bias(lc.f.moe);
    bias[0] = bias[1] = 100.0;
    layer_case_objective(&lc);
    stats_row row;
    ffn_stats_row(&lc.f, &row);
    CHECK(fabs(row.aux[1] - 1.0) < 1e-6, "load loss under a bias of +100 on 2 of 4 experts (k 2): cv^2 %.9f, expected 1",
          row.aux[1]);
    layer_case_free(&lc);
}

/* Forced balance: 16 tokens x k 2 over 4 experts give exactly 8 each, for any router. */
static void check_force_balance(run_config *cfg) {
    layer_case lc;
    cfg->force_balance = 1;
    setup(&lc, cfg, 16);
    layer_case_objective(&lc);
    stats_row row;
    ffn_stats_row(&lc.f, &row);
    int even = 1;
    for (int e = 0; e < cfg->experts; e++) even &= row.tokens[e] == 8;
    CHECK(even, "force balance: every expert 8 of 32 assignments (got %lld %lld %lld %lld)",
          (long long)row.tokens[0], (long long)row.tokens[1], (long long)row.tokens[2],
          (long long)row.tokens[3]);
    layer_case_free(&lc);
}

/*
 * Eval capacity: the same routing (switch, no jitter) in training with cf 0 and in
 * eval with eval_capacity_factor 0.5 drops tokens only in eval; the eval output
 * equals the reference under its routing; eval_capacity_factor 0 gives the training
 * output bit for bit.
 */
static void check_eval_capacity(run_config *cfg) {
    cfg->gate = GATE_SWITCH;
    cfg->top_k = 1;
    for (int pass = 0; pass < 2; pass++) {
        layer_case lc;
        cfg->eval_capacity_factor = pass == 0 ? 0.5f : 0.0f;
        setup(&lc, cfg, 40);
        layer_case_objective(&lc);
        float *train_out = xcalloc((size_t)(lc.n * lc.C), sizeof(float));
        memcpy(train_out, lc.out, sizeof(float) * (size_t)(lc.n * lc.C));
        lc.ctx.training = 0;
        layer_case_objective(&lc);
        int differ = memcmp(train_out, lc.out, sizeof(float) * (size_t)(lc.n * lc.C)) != 0;
        if (pass == 0) {
            CHECK(differ, "eval capacity 0.5: the eval output drops tokens the training one keeps");
            layer_case_check_reference("eval capacity 0.5: eval output vs reference", &lc, 1e-4, 1e-5);
        } else {
            CHECK(!differ, "eval capacity 0 (dropless): eval output equals training output bitwise");
        }
        free(train_out);
        layer_case_free(&lc);
    }
}

static run_config base_config(void);

/* 8 experts in G groups, gk groups a token and k experts in each. */
static void set_groups(run_config *c, int G, int gk, int k) {
    c->experts = 8;
    c->groups = G;
    c->group_k = gk;
    c->top_k = k;
}

/*
 * Hierarchical routing: with the primary router sending every token to group 2
 * (of 4, 2 experts each; group_k 1, k 2), all assignments land on experts 4 and 5,
 * the primary gate is 1 so each gate is the secondary one (a token's two sum to 1),
 * the group-level importance cv^2 is 3 (n, 0, 0, 0 over 4 groups), and the stats
 * row carries both levels' losses.
 */
static void check_hier_routing(run_config *cfg) {
    set_groups(cfg, 4, 1, 2);
    cfg->w_importance = 1.0f;
    layer_case lc;
    setup(&lc, cfg, 16);
    const tensor_spec *r = tensor_find(&lc.tab, "h.0.moe.group_router.w");
    const tensor_spec *nz = tensor_find(&lc.tab, "h.0.moe.group_noise.w");
    CHECK(r && nz && r->shape[0] == 4, "hierarchical: a primary router of 4 groups is registered");
    if (!r || !nz) return;
    for (size_t i = 0; i < r->numel; i++) lc.params[r->offset + i] = 0.0f;
    for (size_t i = 0; i < nz->numel; i++) lc.params[nz->offset + i] = -20.0f; /* no noise */
    for (int64_t t = 0; t < lc.n; t++) /* channel 0 is 1, the rest 0 */
        for (int c = 0; c < lc.C; c++) lc.in[t * lc.C + c] = c == 0 ? 1.0f : 0.0f;
    lc.params[r->offset + 2 * lc.C] = 50.0f; /* group 2's logit: 50 x channel 0 */
    layer_case_objective(&lc);
    stats_row row;
    ffn_stats_row(&lc.f, &row);
    stats_layer_desc d;
    ffn_stats_describe(&lc.f, &d);
    int64_t elsewhere = 0;
    for (int e = 0; e < 8; e++) elsewhere += e == 4 || e == 5 ? 0 : row.tokens[e];
    CHECK(row.tokens[4] == 16 && row.tokens[5] == 16 && elsewhere == 0,
          "hierarchical: group 2 takes every token on both of its experts (got %lld %lld, %lld elsewhere)",
          (long long)row.tokens[4], (long long)row.tokens[5], (long long)elsewhere);
    CHECK(d.n_aux == 7 && d.groups == 4 && strcmp(d.aux_names[5], "group_importance") == 0,
          "hierarchical: stats describe 7 aux losses and 4 groups (got %d, %d)", d.n_aux, d.groups);
    CHECK(fabs(row.aux[5] - 3.0) < 1e-4, "hierarchical: group importance cv^2 %.6f, expected 3", row.aux[5]);
    layer_case_free(&lc);
}

/* The official convention is the mean convention times n / h^2 (n tokens, h x h window). */
static void check_moge_convention(void) {
    double aux[2];
    for (int conv = 0; conv < 2; conv++) {
        run_config c = base_config();
        c.ffn_kind = FFN_MOGE;
        c.experts = 16;
        c.moge_lambda = 0.5f;
        c.moge_convention = conv;
        layer_case lc;
        rng_seed(&g_rng, 99); /* the same parameters and input for both */
        setup(&lc, &c, 12);
        layer_case_objective(&lc);
        stats_row row;
        ffn_stats_row(&lc.f, &row);
        aux[conv] = row.aux[4];
        layer_case_free(&lc);
    }
    CHECK(fabs(aux[1] - aux[0] * 12.0 / 9.0) <= 1e-12 * aux[1] + 1e-15,
          "moge official convention: %.12g, expected the mean convention's %.12g x 12 / 9", aux[1], aux[0]);
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
    c.moge_convention = 1;
    c.moge_lambda = 30.0f * 9.0f / 12.0f; /* the same weight per token at 12 tokens, h = 3 */
    check_gradients("moge penalty, official convention (sum / h^2)", &c);
    check_moge_convention();

    c = base_config();
    check_collapse_guard(&c);

    /* shared FFN beside the experts: reference and gradients (its tensors included) */
    c = base_config();
    c.shared_hidden = 5;
    check_reference("noisy top-2 + shared FFN", &c);
    check_gradients("noisy top-2 + shared FFN", &c);
    c.gate = GATE_SWITCH;
    c.top_k = 1;
    c.aux_alpha = 20.0f;
    check_gradients("switch top-1 + shared FFN", &c);

    /* aux-loss-free balancing bias, forced balance, eval capacity */
    c = base_config();
    c.expert_bias_rate = 0.01f;
    check_gradients_biased("noisy top-2 output, expert bias", &c);
    c.w_load = 50.0f;
    check_gradients_biased("load loss with expert bias", &c);
    c = base_config();
    check_expert_bias(&c);
    c = base_config();
    check_bias_load(&c);
    c = base_config();
    check_force_balance(&c);
    c.force_balance = 1;
    c.w_importance = 20.0f;
    c.w_load = 20.0f;
    check_gradients("forced balance: gates and importance loss", &c);
    c = base_config();
    check_eval_capacity(&c);

    /* hierarchical MoE: both levels against the reference and finite differences
     * (groups, groups a token, experts in each; capacity; aux weights; shared FFN) */
    static const struct {
        int G, gk, k, shared;
        float cf, w_imp, w_load;
        const char *name;
    } hier[] = {
        {2, 1, 2, 0, 0.0f, 0.0f, 0.0f, "hierarchical output (1 of 2 groups, 2 of 4 experts)"},
        {4, 2, 1, 0, 0.8f, 0.0f, 0.0f, "hierarchical output (2 of 4 groups, 1 of 2 experts), capacity 0.8"},
        {4, 2, 1, 0, 0.0f, 50.0f, 0.0f, "hierarchical importance losses, both levels"},
        {4, 2, 1, 0, 0.0f, 0.0f, 50.0f, "hierarchical load losses, both levels"},
        {2, 1, 2, 0, 0.0f, 0.0f, 50.0f, "hierarchical load losses (1 of 2 groups, 2 of 4)"},
        {2, 1, 2, 5, 0.0f, 0.0f, 50.0f, "hierarchical + shared FFN"},
    };
    for (size_t i = 0; i < sizeof hier / sizeof hier[0]; i++) {
        c = base_config();
        set_groups(&c, hier[i].G, hier[i].gk, hier[i].k);
        c.shared_hidden = hier[i].shared;
        c.capacity_factor = hier[i].cf;
        c.w_importance = hier[i].w_imp;
        c.w_load = hier[i].w_load;
        if (i < 2) check_reference(hier[i].name, &c);
        check_gradients(hier[i].name, &c);
    }
    c = base_config();
    check_hier_routing(&c);

    gemm_shutdown();
    int rc = check_finish("moe: grouped GEMMs equal the reference; gates, aux losses, capacity and moge against finite differences; collapse guard; shared FFN, expert bias, forced balance, eval capacity; hierarchical gates");
    MPI_Finalize();
    return rc;
}
