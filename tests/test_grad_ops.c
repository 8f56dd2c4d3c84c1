/*
 * Finite-difference gradient checks of every op and of the dense FFN.
 * Each op's scalar objective is sum(out * R) for a fixed random R, so its
 * backward is called with dout = R; every input element is perturbed by +-h
 * and the central difference compared with the analytic gradient.
 */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "infmoe/ffn.h"
#include "infmoe/gemm.h"
#include "infmoe/ops.h"
#include "infmoe/util.h"

static const double H_STEP = 1e-2, RTOL = 2e-2, ATOL = 2e-3;

static rng_state g_rng;

static float *rand_buf(long n, float scale) {
    float *x = xmalloc(sizeof(float) * n);
    for (long i = 0; i < n; i++) x[i] = scale * (2.0f * rng_uniform(&g_rng) - 1.0f);
    return x;
}

static float *zeros(long n) { return xcalloc((size_t)n, sizeof(float)); }

static double dot(const float *a, const float *b, long n) {
    double s = 0.0;
    for (long i = 0; i < n; i++) s += (double)a[i] * (double)b[i];
    return s;
}

/* Compare analytic d objective / d x (grad) with central differences of objective(). */
typedef double (*objective_fn)(void *ctx);
static void fd_check(const char *what, float *x, const float *grad, long n, objective_fn f,
                     void *ctx) {
    float *fd = xmalloc(sizeof(float) * n);
    for (long i = 0; i < n; i++) {
        float keep = x[i];
        x[i] = keep + (float)H_STEP;
        double up = f(ctx);
        x[i] = keep - (float)H_STEP;
        double down = f(ctx);
        x[i] = keep;
        fd[i] = (float)((up - down) / (2.0 * H_STEP));
    }
    check_arrays_close(what, grad, fd, n, RTOL, ATOL);
    free(fd);
}

/* ---- layernorm ---- */
typedef struct { float *out, *mean, *rstd, *inp, *w, *b, *R; int N, C; } ln_ctx;
static double ln_obj(void *p) {
    ln_ctx *c = p;
    layernorm_forward(c->out, c->mean, c->rstd, c->inp, c->w, c->b, c->N, c->C);
    return dot(c->out, c->R, (long)c->N * c->C);
}
static void check_layernorm(void) {
    ln_ctx c = {.N = 5, .C = 7};
    long nc = (long)c.N * c.C;
    c.inp = rand_buf(nc, 1.0f);
    c.w = rand_buf(c.C, 1.0f);
    c.b = rand_buf(c.C, 1.0f);
    c.R = rand_buf(nc, 1.0f);
    c.out = zeros(nc);
    c.mean = zeros(c.N);
    c.rstd = zeros(c.N);
    float *dinp = zeros(nc), *dw = zeros(c.C), *db = zeros(c.C);
    ln_obj(&c);
    layernorm_backward(dinp, dw, db, c.R, c.inp, c.w, c.mean, c.rstd, c.N, c.C);
    fd_check("layernorm d/dinp", c.inp, dinp, nc, ln_obj, &c);
    fd_check("layernorm d/dweight", c.w, dw, c.C, ln_obj, &c);
    fd_check("layernorm d/dbias", c.b, db, c.C, ln_obj, &c);
}

/* ---- matmul ---- */
typedef struct { float *out, *inp, *w, *b, *R; int N, C, OC; } mm_ctx;
static double mm_obj(void *p) {
    mm_ctx *c = p;
    matmul_forward(c->out, c->inp, c->w, c->b, c->N, c->C, c->OC, 0);
    return dot(c->out, c->R, (long)c->N * c->OC);
}
static void check_matmul(void) {
    mm_ctx c = {.N = 6, .C = 5, .OC = 9};
    c.inp = rand_buf((long)c.N * c.C, 1.0f);
    c.w = rand_buf((long)c.OC * c.C, 1.0f);
    c.b = rand_buf(c.OC, 1.0f);
    c.R = rand_buf((long)c.N * c.OC, 1.0f);
    c.out = zeros((long)c.N * c.OC);
    float *dinp = zeros((long)c.N * c.C), *dw = zeros((long)c.OC * c.C), *db = zeros(c.OC);
    matmul_backward(dinp, dw, db, c.R, c.inp, c.w, c.N, c.C, c.OC);
    fd_check("matmul d/dinp", c.inp, dinp, (long)c.N * c.C, mm_obj, &c);
    fd_check("matmul d/dweight", c.w, dw, (long)c.OC * c.C, mm_obj, &c);
    fd_check("matmul d/dbias", c.b, db, c.OC, mm_obj, &c);
}

/* ---- attention ---- */
typedef struct { float *out, *att, *qkv, *R; int B, T, C, NH; } at_ctx;
static double at_obj(void *p) {
    at_ctx *c = p;
    attention_forward(c->out, c->att, c->qkv, c->B, c->T, c->C, c->NH);
    return dot(c->out, c->R, (long)c->B * c->T * c->C);
}
static void check_attention(void) {
    at_ctx c = {.B = 2, .T = 5, .C = 8, .NH = 2};
    long n = (long)c.B * c.T * c.C;
    c.qkv = rand_buf(3 * n, 1.0f);
    c.R = rand_buf(n, 1.0f);
    c.out = zeros(n);
    c.att = zeros((long)c.B * c.NH * c.T * c.T);
    float *dqkv = zeros(3 * n), *scratch = zeros((long)c.T * c.T);
    at_obj(&c);
    attention_backward(dqkv, scratch, c.R, c.qkv, c.att, c.B, c.T, c.C, c.NH, 1);
    fd_check("attention d/dqkv", c.qkv, dqkv, 3 * n, at_obj, &c);
    /* causality: the output at t must not depend on tokens after t */
    float *before = xmalloc(sizeof(float) * n);
    memcpy(before, c.out, sizeof(float) * n);
    for (int j = 0; j < 3 * c.C; j++) c.qkv[(c.T - 1) * 3 * c.C + j] += 1.0f; /* last token, b=0 */
    at_obj(&c);
    int leaked = 0;
    for (long i = 0; i < (long)(c.T - 1) * c.C; i++) leaked |= c.out[i] != before[i];
    CHECK(!leaked, "attention output at t < T-1 changed when token T-1 changed");
}

/* ---- gelu ---- */
typedef struct { float *out, *inp, *R; int N; } ge_ctx;
static double ge_obj(void *p) {
    ge_ctx *c = p;
    gelu_forward(c->out, c->inp, c->N);
    return dot(c->out, c->R, c->N);
}
static void check_gelu(void) {
    ge_ctx c = {.N = 64};
    c.inp = rand_buf(c.N, 4.0f);
    c.R = rand_buf(c.N, 1.0f);
    c.out = zeros(c.N);
    float *dinp = zeros(c.N);
    gelu_backward(dinp, c.inp, c.R, c.N);
    fd_check("gelu d/dinp", c.inp, dinp, c.N, ge_obj, &c);
}

/*
 * The GELUs run sixteen lanes at a time with exp_fast's clamps as blends; every
 * element must have the scalar formula's bits, tails and specials included (the
 * reference below is ops.h's scalar tanh_fast, written as before vectorisation).
 */
static float gelu_ref(float x) {
    return 0.5f * x * (1.0f + tanh_fast(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}
static float gelu_grad_ref(float x) {
    float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    float th = tanh_fast(u);
    float sech2 = 1.0f - th * th;
    return 0.5f * (1.0f + th) + 0.5f * x * sech2 * 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * x * x);
}
static void check_gelu_lanes(void) {
    const long N = 16 * 4096 + 13;
    float *x = rand_buf(N, 8.0f), *dout = rand_buf(N, 2.0f), *acc = rand_buf(N, 1.0f);
    const float special[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 1e-30f, -1e-30f, 1e-40f,
                             -43.5f, 44.0f, -44.25f, 87.0f, -87.0f, 88.5f, -200.0f, 200.0f,
                             3.4e38f, -3.4e38f, 9.0f, -9.0f, 20.0f, -20.0f};
    const int ns = (int)(sizeof special / sizeof special[0]);
    for (int i = 0; i < ns; i++) x[37 * i] = special[i], x[N - 1 - i] = special[i];
    for (long i = 0; i < 4096; i++) x[20000 + i] = -60.0f + 120.0f * (float)i / 4096; /* a sweep */
    float *out = zeros(N), *din = xmalloc(sizeof(float) * (size_t)N);
    memcpy(din, acc, sizeof(float) * (size_t)N);
    bf16 *out16 = xmalloc(sizeof(bf16) * (size_t)N), *din16 = xmalloc(sizeof(bf16) * (size_t)N);
    gelu_forward(out, x, N);
    gelu_backward(din, x, dout, N);
    gelu_forward_bf16(out16, x, N);
    gelu_backward_bf16(din16, x, dout, N);
    long bad = 0, bad16 = 0;
    for (long i = 0; i < N; i++) {
        float want = gelu_ref(x[i]), dwant = acc[i] + gelu_grad_ref(x[i]) * dout[i];
        bad += memcmp(&out[i], &want, sizeof want) != 0 || memcmp(&din[i], &dwant, sizeof dwant) != 0;
        bad16 += out16[i] != bf16_round(want) || din16[i] != bf16_round(gelu_grad_ref(x[i]) * dout[i]);
    }
    CHECK(bad == 0, "fp32 GELU: %ld of %ld elements differ from the scalar formula's bits", bad, N);
    CHECK(bad16 == 0, "bf16 GELU: %ld of %ld elements differ from the scalar formula's bits", bad16, N);
    free(x), free(dout), free(acc), free(out), free(din), free(out16), free(din16);
}

/* ---- encoder ---- */
typedef struct { float *out, *wte, *wpe, *R; int32_t *tok; int B, T, C; } en_ctx;
static double en_obj(void *p) {
    en_ctx *c = p;
    encoder_forward(c->out, c->tok, c->wte, c->wpe, c->B, c->T, c->C);
    return dot(c->out, c->R, (long)c->B * c->T * c->C);
}
static void check_encoder(void) {
    en_ctx c = {.B = 2, .T = 4, .C = 3};
    int V = 5;
    int32_t tok[8] = {0, 3, 3, 1, 4, 0, 3, 2};
    c.tok = tok;
    c.wte = rand_buf((long)V * c.C, 1.0f);
    c.wpe = rand_buf((long)c.T * c.C, 1.0f);
    c.R = rand_buf((long)c.B * c.T * c.C, 1.0f);
    c.out = zeros((long)c.B * c.T * c.C);
    float *dwte = zeros((long)V * c.C), *dwpe = zeros((long)c.T * c.C);
    encoder_backward(dwte, dwpe, c.R, c.tok, c.B, c.T, c.C);
    fd_check("encoder d/dwte", c.wte, dwte, (long)V * c.C, en_obj, &c);
    fd_check("encoder d/dwpe", c.wpe, dwpe, (long)c.T * c.C, en_obj, &c);
}

/* ---- cross-entropy with vocabulary padding ---- */
typedef struct { float *logits, *probs, *losses; int32_t *tg; int N, V, Vp; } ce_ctx;
static double ce_obj(void *p) {
    ce_ctx *c = p;
    crossentropy_forward(c->losses, c->probs, c->logits, c->tg, c->N, c->V, c->Vp);
    double s = 0.0;
    for (int i = 0; i < c->N; i++) s += c->losses[i];
    return s / c->N;
}
static void check_crossentropy(void) {
    ce_ctx c = {.N = 4, .V = 6, .Vp = 8};
    int32_t tg[4] = {0, 5, 2, 2};
    c.tg = tg;
    c.logits = rand_buf((long)c.N * c.Vp, 3.0f);
    c.probs = zeros((long)c.N * c.Vp);
    c.losses = zeros(c.N);
    float *dlogits = zeros((long)c.N * c.Vp);
    ce_obj(&c);
    crossentropy_backward(dlogits, c.probs, c.tg, 1.0f / c.N, c.N, c.V, c.Vp);
    fd_check("cross-entropy d/dlogits (padding columns 0)", c.logits, dlogits, (long)c.N * c.Vp,
             ce_obj, &c);
    /* In place (probs aliasing logits), as the model uses it, gives the same losses. */
    float *copy = xmalloc(sizeof(float) * c.N * c.Vp), *l2 = zeros(c.N);
    memcpy(copy, c.logits, sizeof(float) * c.N * c.Vp);
    crossentropy_forward(l2, copy, copy, c.tg, c.N, c.V, c.Vp);
    check_arrays_close("cross-entropy in place", l2, c.losses, c.N, 1e-6, 1e-6);
}

/* Without AVX-512 the exponentials run sixteen lanes at a time and are then summed
 * in order: every probability and loss must have the scalar loop's bits (exp_fast,
 * sum i = 0, 1, ...), the lower clamp, the tail and the padding included, in place or
 * not. With AVX-512 gcc vectorises the sum itself, in its lane order: there they
 * must agree to round-off. */
static void check_crossentropy_lanes(void) {
    const int N = 3, V = 16 * 70 + 11, Vp = 16 * 71;
    float *logits = rand_buf((long)N * Vp, 30.0f);
    for (int i = 0; i < 40; i++) logits[7 * i] = -150.0f + 7.5f * (float)i; /* past the lower clamp */
    logits[Vp + 3] = 120.0f, logits[2 * Vp + V - 1] = -300.0f;
    int32_t tg[3] = {0, V - 1, 500};
    float *probs = zeros((long)N * Vp), *losses = zeros(N), *l2 = zeros(N);
    float *copy = xmalloc(sizeof(float) * (size_t)N * (size_t)Vp);
    memcpy(copy, logits, sizeof(float) * (size_t)N * (size_t)Vp);
    crossentropy_forward(losses, probs, logits, tg, N, V, Vp);
    crossentropy_forward(l2, copy, copy, tg, N, V, Vp);
    long bad = 0;
#if defined(__AVX512F__)
    const int exact = 0;
#else
    const int exact = 1;
#endif
#define SAME(a, b) (exact ? memcmp(&(a), &(b), sizeof(float)) == 0 : fabsf((a) - (b)) <= 1e-6f * (1.0f + fabsf(b)))
    for (int n = 0; n < N; n++) {
        const float *l = logits + (long)n * Vp;
        float max = -INFINITY, sum = 0.0f, e[16 * 71];
        for (int i = 0; i < V; i++) max = l[i] > max ? l[i] : max;
        for (int i = 0; i < V; i++) e[i] = exp_fast(l[i] - max), sum += e[i];
        const float inv = 1.0f / sum, loss = -(l[tg[n]] - max - logf(sum));
        for (int i = 0; i < Vp; i++) {
            const float want = i < V ? e[i] * inv : 0.0f;
            bad += !SAME(probs[(long)n * Vp + i], want) || !SAME(copy[(long)n * Vp + i], want);
        }
        bad += !SAME(losses[n], loss) || !SAME(l2[n], loss);
    }
#undef SAME
    CHECK(bad == 0, "cross-entropy: %ld probabilities or losses differ from the scalar loop's %s", bad,
          exact ? "bits" : "values beyond round-off (AVX-512: gcc's lane order)");
    free(logits), free(probs), free(losses), free(l2), free(copy);
}

/* ---- dense FFN through its interface ---- */
typedef struct { ffn_layer f; float *params, *in, *out, *R; int64_t n; } ff_ctx;
static double ff_obj(void *p) {
    ff_ctx *c = p;
    memset(c->out, 0, sizeof(float) * c->n * 6);
    ffn_forward(&c->f, c->params, c->out, c->in, c->n, NULL);
    return dot(c->out, c->R, (long)c->n * 6);
}
static void check_ffn_dense(void) {
    run_config cfg;
    config_defaults(&cfg);
    cfg.n_embd = 6;
    cfg.ffn_hidden = 10;
    cfg.n_layer = 1;
    tensor_table tab = {0};
    ff_ctx c = {.n = 5};
    ffn_init(&c.f, &cfg, 0, &tab, c.n, NULL);
    c.params = rand_buf((long)tab.total, 0.5f);
    float *grads = zeros((long)tab.total);
    c.in = rand_buf(c.n * 6, 1.0f);
    c.out = zeros(c.n * 6);
    c.R = rand_buf(c.n * 6, 1.0f);
    float *din = zeros(c.n * 6), *scratch = zeros((long)ffn_scratch_floats(&c.f, c.n));
    ff_obj(&c);
    ffn_backward(&c.f, c.params, grads, din, c.R, c.in, c.n, scratch, NULL);
    fd_check("dense ffn d/din", c.in, din, c.n * 6, ff_obj, &c);
    for (int t = 0; t < tab.n; t++) {
        char what[96];
        snprintf(what, sizeof what, "dense ffn d/d%s", tab.t[t].name);
        fd_check(what, c.params + tab.t[t].offset, grads + tab.t[t].offset,
                 (long)tab.t[t].numel, ff_obj, &c);
    }
    ffn_free(&c.f);
    tensor_table_free(&tab);
}

int main(void) {
    rng_seed(&g_rng, 42);
    check_encoder();
    check_layernorm();
    check_matmul();
    check_attention();
    check_gelu();
    check_gelu_lanes();
    check_crossentropy();
    check_crossentropy_lanes();
    check_ffn_dense();
    gemm_shutdown();
    return check_finish("gradients: every op and the dense FFN against finite differences");
}
