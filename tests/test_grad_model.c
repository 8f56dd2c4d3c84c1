/*
 * Finite-difference check of the whole model on tiny configs: dense, noisy top-k
 * MoE in every layer, Switch MoE in every second layer, and MoGE. The objective
 * is the model's loss: mean cross-entropy plus the MoE layers' aux losses.
 * For every parameter tensor: the derivative of the loss along the tensor's own
 * gradient direction (which must equal the gradient's norm) and along a random
 * direction, by central differences, plus single elements of each tensor.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "infmoe/dist.h"
#include "infmoe/gemm.h"
#include "infmoe/model.h"
#include "infmoe/util.h"

static gpt_model m;
static int32_t *inputs, *targets;

static int skipped, probes;

/* The routing of every MoE layer in the last forward (0 for a dense model). */
static uint64_t routing(void) {
    uint64_t h = 0;
    for (int l = 0; l < m.L; l++) h = h * 31 + ffn_routing_hash(&m.ffn[l]);
    return h;
}

static double loss_at(void) {
    double ce = model_forward(&m, inputs, targets);
    return ce + m.aux_loss;
}

/*
 * d loss / d h of loss(p + h * dir) on tensor t, dir of unit norm; NAN when the
 * perturbation changes a routing decision (the loss is not differentiable there).
 */
static double directional_fd(const tensor_spec *t, const float *dir, double h) {
    float *p = m.params + t->offset;
    float *keep = xmalloc(sizeof(float) * t->numel);
    memcpy(keep, p, sizeof(float) * t->numel);
    loss_at();
    uint64_t base = routing();
    for (size_t i = 0; i < t->numel; i++) p[i] = keep[i] + (float)(h * dir[i]);
    double up = loss_at();
    int same = routing() == base;
    for (size_t i = 0; i < t->numel; i++) p[i] = keep[i] - (float)(h * dir[i]);
    double down = loss_at();
    same &= routing() == base;
    memcpy(p, keep, sizeof(float) * t->numel);
    free(keep);
    probes++;
    if (!same) {
        skipped++;
        return NAN;
    }
    return (up - down) / (2.0 * h);
}

static void check_model(const char *label, run_config cfg, const dist_ctx *d) {
    /* MoE models: a smaller step, so that few probes cross a routing boundary */
    const double step = cfg.ffn_kind == FFN_DENSE ? 1e-2 : cfg.ffn_kind == FFN_INFINITE ? 1e-3 : 2e-3;
    skipped = probes = 0;
    tiny_backbone(&cfg, 16, 2, 8, 50); /* vocabulary padded to 64: the padding path is exercised */
    cfg.ffn_hidden = 64;
    if (cfg.ffn_kind != FFN_DENSE && cfg.ffn_kind != FFN_INFINITE) cfg.expert_hidden = 24;
    const int B = 2;
    model_build(&m, &cfg, B, cfg.ffn_kind == FFN_DENSE ? NULL : d);
    model_init_params(&m, 1);
    model_set_step(&m, 2, 0, 1);
    rng_state r;
    rng_seed(&r, 3);
    /* Larger, non-GPT-2 values so that every path carries a visible gradient. */
    for (size_t i = 0; i < m.tensors.total; i++) m.params[i] += 0.1f * rng_normal(&r);
    inputs = xcalloc((size_t)B * cfg.seq_len, sizeof(int32_t));
    targets = xcalloc((size_t)B * cfg.seq_len, sizeof(int32_t));
    for (int i = 0; i < B * cfg.seq_len; i++) {
        inputs[i] = (int32_t)(rng_u64(&r) % 50);
        targets[i] = (int32_t)(rng_u64(&r) % 50);
    }
    loss_at();
    model_zero_grad(&m);
    model_backward(&m);
    float *grads = xmalloc(sizeof(float) * m.tensors.total);
    memcpy(grads, m.grads, sizeof(float) * m.tensors.total);

    for (int ti = 0; ti < m.tensors.n; ti++) {
        const tensor_spec *t = &m.tensors.t[ti];
        const float *g = grads + t->offset;
        double norm = 0.0;
        for (size_t i = 0; i < t->numel; i++) norm += (double)g[i] * g[i];
        norm = sqrt(norm);
        float *dir = xmalloc(sizeof(float) * t->numel);
        if (strcmp(t->name, "wte") == 0) {
            /* padding rows get no gradient: they never reach the loss */
            double pad = 0.0;
            for (size_t i = (size_t)cfg.vocab_size * cfg.n_embd; i < t->numel; i++) pad += fabs(g[i]);
            CHECK(pad == 0.0, "wte padding rows have gradient %g", pad);
        }
        if (norm > 0) {
            for (size_t i = 0; i < t->numel; i++) dir[i] = (float)(g[i] / norm);
            double fd = directional_fd(t, dir, step);
            CHECK(isnan(fd) || close_enough(fd, norm, 2e-2, 2e-4), "%s %s: along its gradient fd %.6g vs |g| %.6g",
                  label, t->name, fd, norm);
        }
        double rn = 0.0, an = 0.0;
        for (size_t i = 0; i < t->numel; i++) {
            dir[i] = rng_normal(&r);
            rn += (double)dir[i] * dir[i];
        }
        for (size_t i = 0; i < t->numel; i++) {
            dir[i] = (float)(dir[i] / sqrt(rn));
            an += (double)dir[i] * g[i];
        }
        double fd = directional_fd(t, dir, step);
        CHECK(isnan(fd) || close_enough(fd, an, 2e-2, 3e-4), "%s %s: along a random direction fd %.6g vs g.d %.6g",
              label, t->name, fd, an);
        /* a few single elements */
        for (int k = 0; k < 3; k++) {
            size_t i = rng_u64(&r) % t->numel;
            memset(dir, 0, sizeof(float) * t->numel);
            dir[i] = 1.0f;
            double fe = directional_fd(t, dir, step);
            CHECK(isnan(fe) || close_enough(fe, g[i], 3e-2, 3e-4), "%s %s[%zu]: fd %.6g vs grad %.6g", label,
                  t->name, i, fe, (double)g[i]);
        }
        free(dir);
    }
    CHECK(skipped * 10 <= probes, "%s: %d of %d probes skipped (routing changed)", label, skipped,
          probes);
    free(grads);
    free(inputs);
    free(targets);
    model_free(&m);
}

int main(int argc, char **argv) {
    dist_ctx d;
    dist_init(&d, &argc, &argv);
    run_config cfg;
    config_defaults(&cfg);
    check_model("dense", cfg, &d);
    cfg.ffn_kind = FFN_TOPK;
    cfg.experts = 4;
    cfg.top_k = 2;
    cfg.z_loss = 0.01f;
    check_model("noisy top-2", cfg, &d);
    cfg.gate = GATE_SWITCH;
    cfg.top_k = 1;
    cfg.ffn_every = 2;
    cfg.jitter = 0.01f;
    check_model("switch, every 2nd layer", cfg, &d);
    config_defaults(&cfg);
    cfg.ffn_kind = FFN_MOGE;
    cfg.experts = 8;
    cfg.moge_lambda = 0.05f;
    check_model("moge", cfg, &d);
    config_defaults(&cfg);
    cfg.ffn_kind = FFN_INFINITE;
    cfg.inf_units = 64;
    cfg.mask_block = 8;
    cfg.latent_dim = 1;
    cfg.router_hidden = 8;
    cfg.kl_weight = 0.1f;
    check_model("infinite window", cfg, &d);
    cfg.mask = MASK_LEARNED;
    cfg.latent_dim = 3;
    check_model("infinite learned", cfg, &d);
    gemm_shutdown();
    int rc = check_finish("gradients: whole dense and MoE models against finite differences");
    dist_finalize(&d);
    return rc;
}
