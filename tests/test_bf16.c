/*
 * bf16 precision against fp32 on tiny models of every FFN kind: from the same
 * parameters (GPT-2 init) and batch, the bf16 loss is within 2e-2 of the fp32 loss and every
 * parameter tensor's bf16 gradient has cosine > 0.99 with the fp32 one; the bf16
 * run's all-to-all payloads are half the bytes (vectors in bf16; the expert index,
 * the samples z and the masks' sums stay 4 bytes beside them). Skipped, saying so,
 * on a CPU without AVX-512 BF16 (bf16 is refused there, see tests/run.sh). On one
 * thread and on two (where heads and experts run in parallel, one thread each).
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "infmoe/dispatch.h"
#include "infmoe/dist.h"
#include "infmoe/gemm.h"
#include "infmoe/model.h"
#include "infmoe/ops.h"
#include "infmoe/util.h"

typedef struct {
    uint64_t routing; /* every layer's routing of the forward */
    double loss;
    int64_t bytes; /* all-to-all bytes of one forward and backward */
    float *grads;
} run_result;

static run_result run_once(run_config cfg, precision_kind precision, const dist_ctx *d) {
    cfg.precision = precision;
    gpt_model m;
    const int B = 2;
    model_build(&m, &cfg, B, d);
    model_init_params(&m, 1);
    /* GPT-2's init: from parameters perturbed further, bf16's slightly different
     * activations flip routing decisions (top-k ties, mask blocks) and the two runs
     * then differentiate different functions (router gradients at cosine 0.96-0.98) */
    rng_state r;
    rng_seed(&r, 3);
    int32_t *inputs = xcalloc((size_t)B * cfg.seq_len, sizeof(int32_t));
    int32_t *targets = xcalloc((size_t)B * cfg.seq_len, sizeof(int32_t));
    for (int i = 0; i < B * cfg.seq_len; i++) {
        inputs[i] = (int32_t)(rng_u64(&r) % (uint64_t)cfg.vocab_size);
        targets[i] = (int32_t)(rng_u64(&r) % (uint64_t)cfg.vocab_size);
    }
    model_set_step(&m, 2, 0, 1);
    int64_t b0 = dispatch_bytes_sent();
    run_result res;
    res.loss = model_forward(&m, inputs, targets) + m.aux_loss;
    model_zero_grad(&m);
    model_backward(&m);
    res.bytes = dispatch_bytes_sent() - b0;
    res.routing = 0;
    for (int l = 0; l < m.L; l++) res.routing = res.routing * 31 + ffn_routing_hash(&m.ffn[l]);
    res.grads = xmalloc(sizeof(float) * m.tensors.total);
    memcpy(res.grads, m.grads, sizeof(float) * m.tensors.total);
    free(inputs);
    free(targets);
    model_free(&m);
    return res;
}

/* cosine of two arrays */
static double cosine_of(const float *a, const float *b, size_t n) {
    double d = 0, na = 0, nb = 0;
    for (size_t i = 0; i < n; i++) d += (double)a[i] * b[i], na += (double)a[i] * a[i], nb += (double)b[i] * b[i];
    return d / sqrt(na * nb);
}

static void compare(const char *label, run_config cfg, const dist_ctx *d) {
    tiny_backbone(&cfg, 64, 4, 32, 50);
    cfg.ffn_hidden = 128;
    if (cfg.ffn_kind == FFN_TOPK || cfg.ffn_kind == FFN_MOGE) cfg.expert_hidden = 64;
    run_result f = run_once(cfg, PRECISION_FP32, d), h = run_once(cfg, PRECISION_BF16, d);
    CHECK(fabs(f.loss - h.loss) < 2e-2, "%s: bf16 loss %.6f vs fp32 %.6f", label, h.loss, f.loss);
    gpt_model t;
    model_build(&t, &cfg, 0, NULL); /* the tensor table */
    double worst = 1.0;
    const char *worst_name = "";
    for (int i = 0; i < t.tensors.n; i++) {
        const tensor_spec *s = &t.tensors.t[i];
        const float *gf = f.grads + s->offset, *gh = h.grads + s->offset;
        int zero = 1;
        for (size_t j = 0; j < s->numel && zero; j++) zero = gf[j] == 0 && gh[j] == 0;
        if (zero) continue; /* e.g. the vocabulary padding's share */
        double cosine = cosine_of(gf, gh, s->numel);
        CHECK(cosine > 0.99, "%s: %s gradient cosine %.5f (bf16 vs fp32)", label, s->name, cosine);
        if (cosine < worst) worst = cosine, worst_name = s->name;
    }
    printf("%s: loss fp32 %.6f bf16 %.6f | routing %s | worst gradient cosine %.5f (%s)", label,
           f.loss, h.loss, f.routing == h.routing ? "the same" : "differs", worst, worst_name);
    if (f.bytes > 0) {
        double ratio = (double)h.bytes / (double)f.bytes;
        printf(" | all-to-all bytes %lld -> %lld (%.3fx)", (long long)f.bytes, (long long)h.bytes,
               ratio);
        CHECK(ratio >= 0.5 && ratio <= 0.56, "%s: bf16 all-to-all bytes %.3fx of fp32's", label, ratio);
    }
    printf("\n");
    model_free(&t);
    free(f.grads);
    free(h.grads);
}

/* bf16 attention (causal row blocks) against the fp32 op on the same bf16 values, for
 * T not a multiple of the block and spanning several blocks. */
static void attention_case(int B, int T, int C, int NH) {
    rng_state r;
    rng_seed(&r, 5);
    size_t nq = (size_t)B * T * 3 * C, no = (size_t)B * T * C, na = (size_t)B * NH * T * T;
    float *qkv = xmalloc(sizeof(float) * nq), *out = xmalloc(sizeof(float) * no);
    float *att = xmalloc(sizeof(float) * na), *dout = xmalloc(sizeof(float) * no);
    float *dqkv = xcalloc(nq, sizeof(float)), *scratch = xmalloc(sizeof(float) * (size_t)T * T);
    bf16 *qkv_h = xmalloc(sizeof(bf16) * nq), *out_h = xmalloc(sizeof(bf16) * no);
    bf16 *att_h = xcalloc(na, sizeof(bf16)), *dout_h = xmalloc(sizeof(bf16) * no);
    bf16 *dqkv_h = xmalloc(sizeof(bf16) * nq);
    const int nt = omp_get_max_threads();
    float *s32 = xmalloc(sizeof(float) * attention_bf16_scratch_floats(T, C, NH, nt));
    float *got = xmalloc(sizeof(float) * nq);
    for (size_t i = 0; i < nq; i++) qkv_h[i] = bf16_round(rng_normal(&r));
    for (size_t i = 0; i < no; i++) dout_h[i] = bf16_round(rng_normal(&r));
    f32_from_bf16(qkv, qkv_h, (int64_t)nq);
    f32_from_bf16(dout, dout_h, (int64_t)no);
    attention_forward(out, att, qkv, B, T, C, NH);
    attention_backward(dqkv, scratch, dout, qkv, att, B, T, C, NH, 1);
    attention_forward_bf16(out_h, att_h, s32, qkv_h, B, T, C, NH, nt);
    attention_backward_bf16(dqkv_h, s32, dout_h, qkv_h, att_h, B, T, C, NH, nt);
    f32_from_bf16(got, out_h, (int64_t)no);
    double co = cosine_of(got, out, no);
    check_arrays_close("bf16 attention output", got, out, (long)no, 2e-2, 2e-2);
    f32_from_bf16(got, dqkv_h, (int64_t)nq);
    double cg = cosine_of(got, dqkv, nq);
    CHECK(co > 0.9999 && cg > 0.999, "bf16 attention B%d T%d C%d NH%d: cosine output %.6f, dqkv %.6f",
          B, T, C, NH, co, cg);
    /* the fused ops (row statistics kept, probabilities recomputed): the stored ops' bits */
    bf16 *out_f = xmalloc(sizeof(bf16) * no), *dqkv_f = xmalloc(sizeof(bf16) * nq);
    float *stats = xmalloc(sizeof(float) * (size_t)B * NH * T * 2);
    float *sf = xmalloc(sizeof(float) * attention_fused_scratch_floats(T, C, NH, nt));
    attention_forward_bf16_fused(out_f, stats, sf, qkv_h, B, T, C, NH, nt);
    attention_backward_bf16_fused(dqkv_f, sf, dout_h, qkv_h, stats, B, T, C, NH, nt);
    CHECK(!memcmp(out_f, out_h, sizeof(bf16) * no) && !memcmp(dqkv_f, dqkv_h, sizeof(bf16) * nq),
          "fused bf16 attention B%d T%d C%d NH%d, %d threads: output and dqkv bitwise the stored "
          "attention's", B, T, C, NH, nt);
    free(out_f), free(dqkv_f), free(stats), free(sf);
    printf("attention B%d T%d C%d NH%d, %d threads (causal blocks%s): cosine with fp32 output %.6f, "
           "dqkv %.6f\n", B, T, C, NH, nt, nt > 1 && B * NH >= nt ? ", heads in parallel" : "", co, cg);
    free(qkv), free(out), free(att), free(dout), free(dqkv), free(scratch), free(qkv_h), free(out_h);
    free(att_h), free(dout_h), free(dqkv_h), free(s32), free(got);
}

int main(int argc, char **argv) {
    dist_ctx d;
    dist_init(&d, &argc, &argv);
    if (!gemm_bf16_native()) {
        printf("this CPU has no AVX-512 BF16 (oneDNN: %s): bf16 is refused here\n", gemm_isa_name());
        int rc = check_finish("bf16: skipped, no AVX-512 BF16 on this CPU");
        dist_finalize(&d);
        return rc;
    }
    attention_case(2, 300, 32, 2);
    attention_case(1, 128, 16, 1);
    attention_case(1, 129, 64, 1);
    run_config cfg;
    config_defaults(&cfg);
    compare("dense", cfg, &d);
    cfg.ffn_kind = FFN_TOPK;
    cfg.experts = 4;
    cfg.top_k = 2;
    cfg.z_loss = 0.01f;
    compare("noisy top-2", cfg, &d);
    cfg.gate = GATE_SWITCH;
    cfg.top_k = 1;
    cfg.jitter = 0.01f;
    compare("switch top-1", cfg, &d);
    config_defaults(&cfg);
    cfg.ffn_kind = FFN_MOGE;
    cfg.experts = 8;
    cfg.moge_lambda = 0.05f;
    compare("moge", cfg, &d);
    config_defaults(&cfg);
    cfg.ffn_kind = FFN_INFINITE;
    cfg.inf_units = 256;
    cfg.mask_block = 16;
    cfg.latent_dim = 1;
    cfg.router_hidden = 16;
    cfg.kl_weight = 0.1f;
    compare("infinite window", cfg, &d);
    cfg.mask = MASK_LEARNED;
    cfg.latent_dim = 3;
    compare("infinite learned", cfg, &d);
    /* Two threads: heads, and MoE experts, run in parallel, one thread each. */
    omp_set_num_threads(2);
    attention_case(2, 300, 32, 2);
    config_defaults(&cfg);
    compare("dense, 2 threads", cfg, &d);
    cfg.ffn_kind = FFN_TOPK;
    cfg.experts = 4;
    cfg.top_k = 2;
    compare("noisy top-2, 2 threads", cfg, &d);
    gemm_shutdown();
    int rc = check_finish("bf16: losses and per-tensor gradient cosines against fp32, every FFN kind; "
                          "all-to-all bytes halve");
    dist_finalize(&d);
    return rc;
}
