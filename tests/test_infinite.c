/*
 * ∞-MoE layer on one rank (MPI, ep = 1):
 *  - the block-sparse path equals the masked dense reference (every unit computed,
 *    multiplied by its weight) for mask_block 1, 16 and 64, both mask rules, K = 1, 2, 3;
 *  - finite-difference gradients of the output (and the KL aux loss) with respect
 *    to the input, the router MLP (mu and sigma heads), the learned scores P and q,
 *    and the unit weights, for both mask rules with fixed noise (K = 2);
 *  - stratified sampling: the normal quantile against erfc, each draw inside its
 *    stratum, the strata's mean unbiased; the layer with it against the reference
 *    and finite differences;
 *  - training K drawn per step (ffn.samples_max): the draw's range, spread and
 *    repeatability; the layer at a drawn K against the reference and finite differences.
 * Probes whose perturbation changes a kept block are skipped and counted.
 */
#include <math.h>
#include <mpi.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "infmoe/gemm.h"
#include "infmoe/util.h"
#include "layer_case.h"
#include "infmoe/infinite.h"

static rng_state g_rng;

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

/* The layer's init plus noise: non-zero biases, and sigma larger than at init. */
static void inf_params(layer_case *lc) {
    tensor_init_values(&lc->tab, lc->params, 9);
    for (int t = 0; t < lc->tab.n; t++) {
        const tensor_spec *s = &lc->tab.t[t];
        float add = strstr(s->name, "sigma.b") ? -1.0f : 0.0f;
        for (size_t i = 0; i < s->numel; i++) lc->params[s->offset + i] += add + 0.1f * rng_normal(&g_rng);
    }
}

static void setup(layer_case *lc, const run_config *cfg, int64_t n) {
    layer_case_setup(lc, cfg, n, (ffn_context){MPI_COMM_WORLD, MPI_COMM_WORLD, 1, 1, 0, 11, 4, 10, 0, 1, 0, NULL},
                     inf_params, &g_rng);
}

/* want_k > 0: the forward must have run at that many samples per token */
static void check_reference_k(const char *name, run_config cfg, int want_k) {
    layer_case lc;
    setup(&lc, &cfg, 24);
    char what[160];
    snprintf(what, sizeof what, "%s: block-sparse vs masked dense", name);
    layer_case_check_reference(what, &lc, 1e-4, 1e-5);
    if (want_k > 0)
        CHECK(inf_samples(lc.f.inf) == want_k, "%s: the forward ran at K %d, want %d", name,
              inf_samples(lc.f.inf), want_k);
    layer_case_free(&lc);
}

static void check_reference(const char *name, run_config cfg) { check_reference_k(name, cfg, 0); }

/* ffn.chunk_units: any chunk width computes the same layer; a chunk of one block
 * computes exactly the kept units, wider ones the kept units and more. */
static void check_chunk_units(void) {
    const int want[] = {64, 64, 128, 128, 256, 512, 512}, ask[] = {1, 64, 100, 150, 256, 512, 4096};
    for (int i = 0; i < 7; i++) {
        run_config cfg = base(512, 64, MASK_WINDOW, 2);
        cfg.chunk_units = ask[i];
        layer_case lc;
        setup(&lc, &cfg, 24);
        char what[160];
        snprintf(what, sizeof what, "window, block 64, chunk_units %d: block-sparse vs masked dense", ask[i]);
        layer_case_check_reference(what, &lc, 1e-4, 1e-5);
        double w[2];
        inf_shard_work(lc.f.inf, w);
        /* 8 blocks: whole blocks, rounded up, then down to a divisor (150 -> 3 -> 2) */
        int cu = inf_chunk_units(lc.f.inf);
        CHECK(cu == want[i], "chunk_units %d: chunks of %d units, want %d", ask[i], cu, want[i]);
        CHECK(w[1] > 0 && w[0] >= w[1], "chunk_units %d: computed %g unit rows, kept %g", ask[i], w[0], w[1]);
        if (cu == 64) CHECK(w[0] == w[1], "chunks of one block: computed %g unit rows, kept %g", w[0], w[1]);
        layer_case_free(&lc);
    }
}

/* The knots' update: towards the CDF of the counts mixed 9:1 with the identity,
 * ends fixed, monotone; with even counts the identity stays. */
static void check_balance_update(void) {
    enum { NB = 4 };
    double w[NB + 1] = {0, 0.25, 0.5, 0.75, 1}, even[NB] = {3, 3, 3, 3}, skew[NB] = {6, 2, 0, 0};
    inf_balance_update(w, even, NB, 0.5);
    for (int j = 0; j <= NB; j++) CHECK(fabs(w[j] - j / 4.0) < 1e-15, "even counts moved knot %d to %g", j, w[j]);
    inf_balance_update(w, skew, NB, 0.5);
    /* cdf 0.75, 1, 1 -> targets 0.9 cdf + 0.1 j/4 = 0.7, 0.95, 0.975; halfway from 0.25, 0.5, 0.75 */
    const double want[NB + 1] = {0, 0.475, 0.725, 0.8625, 1};
    for (int j = 0; j <= NB; j++) CHECK(fabs(w[j] - want[j]) < 1e-12, "knot %d: %g, want %g", j, w[j], want[j]);
    double none[NB] = {0};
    inf_balance_update(w, none, NB, 0.5);
    CHECK(fabs(w[1] - 0.475) < 1e-15, "no counts must leave the knots");
}

/* normal_quantile inverts the CDF 0.5 erfc(-x / sqrt 2) to 1e-12 relative, from the lower
 * tail (5e-13) to 0.9995 (all three branches; nearer 1 a double p no longer carries 1e-12
 * of 1 - p); a stratified draw lies in its stratum's quantile interval; the mean of
 * K stratified draws has the variance of the stratified estimator (far below 1 / K). */
static void check_stratified_draws(void) {
    double worst = 0;
    for (int i = 1; i < 2000; i++) {
        double p = i < 1000 ? pow(10.0, -12.0 + 12.0 * i / 1000.0) * 0.5 : (i - 1000 + 0.5) / 1000.0;
        double x = normal_quantile(p), back = 0.5 * erfc(-x / sqrt(2.0));
        double err = fabs(back - p) / fmin(p, 1 - p);
        if (err > worst) worst = err;
    }
    CHECK(worst < 1e-12, "normal_quantile: relative CDF error %g", worst);
    CHECK(fabs(normal_quantile(0.5)) < 1e-15, "quantile at 0.5: %g",
          normal_quantile(0.5));
    CHECK(fabs(normal_quantile(0.975) - 1.959963984540054) < 1e-12, "quantile at 0.975: %.15g",
          normal_quantile(0.975));
    const int K = 4, N = 20000;
    double sum = 0, sum2 = 0;
    int outside = 0;
    for (int t = 0; t < N; t++) {
        uint64_t key = rng_token_key(5, 1000, 3, 3, t);
        double mean = 0;
        for (int k = 0; k < K; k++) {
            float e = rng_key_normal_stratum(key + (uint64_t)k * RNG_KEY_STRIDE, k, K);
            double lo = k ? normal_quantile((double)k / K) : -INFINITY;
            double hi = k < K - 1 ? normal_quantile((double)(k + 1) / K) : INFINITY;
            if (!(e >= lo - 1e-6 && e <= hi + 1e-6)) outside++;
            mean += e / K;
        }
        sum += mean;
        sum2 += mean * mean;
    }
    double m = sum / N, var = sum2 / N - m * m;
    CHECK(outside == 0, "%d stratified draws outside their stratum", outside);
    CHECK(fabs(m) < 4.0 * sqrt(var / N), "stratified mean %g (standard error %g)", m, sqrt(var / N));
    /* iid: var of the mean 1/K = 0.25; stratified over 4 strata: about 0.035 */
    CHECK(var > 0.03 && var < 0.04, "variance of the stratified mean %g, want ~0.035", var);
}

/* ffn.samples_max: a training step's K is a function of (seed, step) alone, inside
 * lo..hi, every value about equally often; one value when hi <= lo. */
static void check_train_samples(void) {
    CHECK(inf_train_samples(7, 3, 2, 2) == 2 && inf_train_samples(7, 3, 4, 0) == 4,
          "a range of one K must give that K");
    enum { LO = 2, HI = 5, N = 8000 };
    int count[HI + 1] = {0}, bad = 0, other_seed = 0;
    for (int step = 0; step < N; step++) {
        int k = inf_train_samples(7, step, LO, HI);
        if (k < LO || k > HI || k != inf_train_samples(7, step, LO, HI)) { bad++; continue; }
        count[k]++;
        other_seed += inf_train_samples(8, step, LO, HI) != k;
    }
    CHECK(bad == 0, "%d steps drew a K outside %d..%d or not the same twice", bad, LO, HI);
    const double mean = (double)N / (HI - LO + 1), sd = sqrt(mean * (1.0 - 1.0 / (HI - LO + 1)));
    for (int k = LO; k <= HI; k++)
        CHECK(fabs(count[k] - mean) < 5.0 * sd, "K %d drawn %d times in %d steps, want ~%.0f", k, count[k], N, mean);
    CHECK(other_seed > N / 2, "another seed drew the same K at %d of %d steps", N - other_seed, N);
}

/* A probe at least, and not many more skipped than checked (z moves with mu). */
static int enough(int checked, int skipped) { return checked >= 1 && skipped <= checked + 2; }

/* Ring balance: a warp far from the identity (knots from skewed counts), so the
 * slopes through which d z passes differ block to block. */
static void skew_warp(layer_case *lc) {
    ffn_state_array s[4];
    if (ffn_state(&lc->f, s, 4) != 1 || strcmp(s[0].name, "ring_warp") != 0) return;
    int nb = (int)s[0].n - 1;
    double *counts = xcalloc((size_t)nb, sizeof(double));
    for (int j = 0; j < nb; j++) counts[j] = 1.0 + (j % 3) * 5.0 + (j < nb / 4 ? 20.0 : 0.0);
    inf_balance_update(s[0].data, counts, nb, 0.8);
    free(counts);
}

static void check_gradients(const char *name, run_config cfg) {
    layer_case lc;
    setup(&lc, &cfg, 10);
    skew_warp(&lc);
    /* with the warp a probe also changes routing when a sample crosses a knot:
     * smaller steps more often */
    layer_case_check_gradients(name, &lc, 50, cfg.balance_rate > 0 ? 6 : 3, enough);
    layer_case_free(&lc);
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
    c.balance_rate = 0.1f;
    check_gradients("window (blocks of 4, K 2, ring balance warp)", c);
    c = base(128, 16, MASK_WINDOW, 2);
    c.balance_rate = 0.1f;
    check_reference("window, block 16, K 2, ring balance", c);
    check_balance_update();
    check_stratified_draws();
    c = base(128, 16, MASK_WINDOW, 3);
    c.stratified = 1;
    check_reference("window, block 16, K 3, stratified", c);
    c = base(64, 4, MASK_WINDOW, 2);
    c.stratified = 1;
    check_gradients("window (blocks of 4, K 2, stratified)", c);
    check_train_samples();
    { /* training with samples_max: this step's K (seed 11, step 4 of the context) */
        char what[96];
        c = base(128, 16, MASK_WINDOW, 2);
        c.stratified = 1;
        c.samples_max = 5;
        const int k = inf_train_samples(11, 4, 2, 5);
        CHECK(k != 2, "the case should draw a K other than ffn.samples (drew %d)", k);
        snprintf(what, sizeof what, "window, block 16, K %d drawn from 2..5, stratified", k);
        check_reference_k(what, c, k);
        c = base(64, 4, MASK_WINDOW, 2);
        c.stratified = 1;
        c.samples_max = 5;
        snprintf(what, sizeof what, "window (blocks of 4, K %d drawn from 2..5, stratified)", k);
        check_gradients(what, c);
    }
    c = base(32, 1, MASK_LEARNED, 2);
    c.kl_weight = 0.5f;
    check_gradients("learned (per unit, K 2, KL)", c);
    c = base(64, 4, MASK_LEARNED, 2);
    check_gradients("learned (blocks of 4, K 2)", c);
    c = base(64, 4, MASK_WINDOW, 2);
    c.shared_hidden = 6; /* the shared FFN every token uses beside its samples */
    check_reference("window, blocks of 4, K 2, shared FFN", c);
    check_gradients("window (blocks of 4, K 2, shared FFN)", c);
    gemm_shutdown();
    check_chunk_units(); /* last: the cases above keep their random draws */
    int rc = check_finish("infinite: block-sparse equals masked dense; router, sampling, both mask rules and the shared FFN against finite differences");
    MPI_Finalize();
    return rc;
}
