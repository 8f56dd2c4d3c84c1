/* model: GPT-2 forward and backward over flat buffers (see model.h). */
#include "infmoe/model.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/gemm.h"
#include "infmoe/ops.h"
#include "infmoe/optim.h"
#include "infmoe/peak.h"
#include "infmoe/util.h"

static size_t add(tensor_table *tab, const char *fmt, int layer, int ndim, int64_t d0, int64_t d1,
                  int decay, tensor_init init, float std) {
    int64_t shape[2] = {d0, d1};
    return tensor_add_layer(tab, fmt, layer, ndim, shape, decay, init, std);
}

/* Carve `n` floats off the front of *cursor. */
static float *carve(float **cursor, size_t n) {
    float *p = *cursor;
    *cursor += (n + 15) / 16 * 16;
    return p;
}

static void build_fp32_acts(gpt_model *m);

/* auto: bf16 where oneDNN runs it natively and its products are clearly faster
 * than fp32 ones (AMX tiles, or vdpbf16ps at this many times the FMA rate: the
 * casts, and the fp32 work bf16 leaves, take back what a smaller gain brings). */
#define AUTO_BF16_RATIO 1.25

int model_bf16_pays(void) {
    return gemm_bf16_native() && (gemm_bf16_amx() || peak_bf16_ratio() >= AUTO_BF16_RATIO);
}

void model_precision_auto_note(char *buf, size_t cap) {
    if (!gemm_bf16_native())
        snprintf(buf, cap, "auto: no AVX-512 BF16 here");
    else if (gemm_bf16_amx())
        snprintf(buf, cap, "auto: AMX");
    else if (peak_bf16_ratio() >= AUTO_BF16_RATIO)
        snprintf(buf, cap, "auto: AVX-512 BF16 products at %.2fx the fp32 rate", peak_bf16_ratio());
    else
        snprintf(buf, cap, "auto: AVX-512 BF16 products at only %.2fx the fp32 rate here",
                 peak_bf16_ratio());
}

int model_precision(const run_config *cfg, char *msg, size_t cap) {
    if (cfg->precision == PRECISION_FP32) return PRECISION_FP32;
    if (cfg->precision == PRECISION_AUTO) return model_bf16_pays() ? PRECISION_BF16 : PRECISION_FP32;
    int native = gemm_bf16_native();
    if (native) return PRECISION_BF16;
    snprintf(msg, cap,
             "train.precision bf16 needs a CPU with AVX-512 BF16, and oneDNN runs %s here%s "
             "(bf16 products would be emulated, slower than fp32, or not run at all); use "
             "train.precision: fp32, or auto (bf16 only where the CPU has it)",
             gemm_isa_name(), getenv("ONEDNN_MAX_CPU_ISA") ? " (ONEDNN_MAX_CPU_ISA is set)" : "");
    return -1;
}

/* Allocate the activations of a bf16 model: fp32 where other layers than
 * products read them, bf16 where only products do. */
static void build_bf16_acts(gpt_model *m) {
    const int L = m->L, T = m->T, C = m->C;
    const size_t nc = (size_t)m->N * (size_t)C, nn = (size_t)m->N;
    const size_t att = (size_t)m->B * (size_t)m->NH * (size_t)T * (size_t)T;
    mem_part *parts = xcalloc((size_t)L * 11 + 16, sizeof *parts);
    size_t n = 0;
#define PART(p, count) parts[n++] = (mem_part)MEM_PART(p, count)
    m->acts = xcalloc((size_t)L, sizeof(block_acts));
    for (int l = 0; l < L; l++) {
        block_acts *a = &m->acts[l];
        PART(a->ln1_mean, nn);
        PART(a->ln1_rstd, nn);
        PART(a->res2, nc);
        PART(a->ln2, nc);
        PART(a->ln2_mean, nn);
        PART(a->ln2_rstd, nn);
        PART(a->res3, nc);
        PART(a->ln1_h, nc);
        PART(a->qkv_h, 3 * nc);
        if (m->att_fused)
            PART(a->att_stats, (size_t)m->B * (size_t)m->NH * (size_t)T * 2);
        else
            PART(a->att_h, att);
        PART(a->atty_h, nc);
    }
    PART(m->encoded, nc);
    PART(m->ln_out, nc);
    PART(m->lnf_mean, nn);
    PART(m->lnf_rstd, nn);
    PART(m->logits, nn * (size_t)m->Vp);
    PART(m->losses, nn);
    PART(m->lnf_h, nc);
    PART(m->dlogits_h, nn * (size_t)m->Vp);
    PART(m->dres_h, nc);
    PART(m->datty_h, nc);
    PART(m->dqkv_h, 3 * nc);
    PART(m->wbf, m->tensors.total);
#undef PART
    m->bf16_mem = mem_carve(parts, n);
    free(parts);
}

void model_build(gpt_model *m, const run_config *cfg, int B, const dist_ctx *d) {
    memset(m, 0, sizeof *m);
    ffn_context *ctx = &m->ctx;
    char msg[512];
    int precision = B > 0 ? model_precision(cfg, msg, sizeof msg) : PRECISION_FP32;
    if (precision < 0) INFMOE_FAIL("%s", msg);
    /* auto rests on a measurement: every rank takes rank 0's choice, and fp32 where
     * any rank lacks native bf16 (mixed nodes, a rank's ONEDNN_MAX_CPU_ISA) */
    if (B > 0 && cfg->precision == PRECISION_AUTO && d && d->world != MPI_COMM_NULL) {
        int native = gemm_bf16_native();
        MPI_Bcast(&precision, 1, MPI_INT, 0, d->world);
        MPI_Allreduce(MPI_IN_PLACE, &native, 1, MPI_INT, MPI_MIN, d->world);
        if (!native) precision = PRECISION_FP32;
    }
    m->bf16 = precision == PRECISION_BF16;
    m->att_fused = m->bf16 && !cfg->att_stored;
    ctx->bf16 = m->bf16;
    ctx->world = d ? d->world : MPI_COMM_NULL;
    ctx->ep_comm = d ? d->ep_comm : MPI_COMM_NULL;
    ctx->world_size = d ? d->size : 1;
    ctx->ep = d ? d->ep : 1;
    ctx->ep_rank = d ? d->ep_rank : 0;
    ctx->seed = (uint64_t)cfg->seed;
    ctx->total_steps = cfg->steps;
    m->L = cfg->n_layer;
    m->C = cfg->n_embd;
    m->NH = cfg->n_head;
    m->T = cfg->seq_len;
    m->V = cfg->vocab_size;
    m->Vp = (m->V + 63) / 64 * 64;
    m->B = B;
    m->N = (int64_t)B * m->T;
    const int L = m->L, C = m->C, T = m->T;
    const int64_t N = m->N;
    const float std = 0.02f, proj_std = 0.02f / sqrtf(2.0f * (float)L);

    tensor_table *tab = &m->tensors;
    m->wte = add(tab, "wte", 0, 2, m->Vp, C, 1, INIT_NORMAL, std);
    m->wpe = add(tab, "wpe", 0, 2, T, C, 1, INIT_NORMAL, std);
    m->block = xcalloc((size_t)L, sizeof(block_offsets));
    m->ffn = xcalloc((size_t)L, sizeof(ffn_layer));
    for (int l = 0; l < L; l++) {
        block_offsets *o = &m->block[l];
        o->ln1_w = add(tab, "h.%d.ln1.w", l, 1, C, 0, 0, INIT_CONST, 1.0f);
        o->ln1_b = add(tab, "h.%d.ln1.b", l, 1, C, 0, 0, INIT_ZERO, 0);
        o->qkv_w = add(tab, "h.%d.attn.qkv.w", l, 2, 3 * C, C, 1, INIT_NORMAL, std);
        o->qkv_b = add(tab, "h.%d.attn.qkv.b", l, 1, 3 * C, 0, 0, INIT_ZERO, 0);
        o->proj_w = add(tab, "h.%d.attn.proj.w", l, 2, C, C, 1, INIT_NORMAL, proj_std);
        o->proj_b = add(tab, "h.%d.attn.proj.b", l, 1, C, 0, 0, INIT_ZERO, 0);
        o->ln2_w = add(tab, "h.%d.ln2.w", l, 1, C, 0, 0, INIT_CONST, 1.0f);
        o->ln2_b = add(tab, "h.%d.ln2.b", l, 1, C, 0, 0, INIT_ZERO, 0);
        ffn_init(&m->ffn[l], cfg, l, tab, N, ctx);
    }
    m->lnf_w = add(tab, "lnf.w", 0, 1, C, 0, 0, INIT_CONST, 1.0f);
    m->lnf_b = add(tab, "lnf.b", 0, 1, C, 0, 0, INIT_ZERO, 0);
    m->n_replicated = (tab->total + 15) / 16 * 16;
    if (tab->total < m->n_replicated) tab->total = m->n_replicated;
    m->shard_seg = xcalloc((size_t)L + 1, sizeof(size_t));
    for (int l = 0; l < L; l++) {
        m->shard_seg[l] = tab->total;
        ffn_register_sharded(&m->ffn[l], tab);
    }
    m->shard_seg[L] = tab->total;
    m->bucket_floats = (size_t)((double)cfg->grad_bucket_mb * (1 << 20) / sizeof(float));
    if (m->bucket_floats < 16) m->bucket_floats = 16;
    if (B == 0) return; /* the tensor table alone: global shapes for checkpoint tools */

    size_t P = tab->total;
    m->params = xcalloc(P, sizeof(float));
    m->grads = xcalloc(P, sizeof(float));
    m->m = xcalloc(P, sizeof(float));
    m->v = xcalloc(P, sizeof(float));

    if (m->bf16) {
        build_bf16_acts(m);
        ctx->wbf = m->wbf;
    } else {
        /* Activations: one buffer, sized by the same carving it is then cut with. */
        build_fp32_acts(m);
    }
    const size_t nc = (size_t)N * C;
    m->inputs = xcalloc((size_t)N, sizeof(int32_t));
    m->targets = xcalloc((size_t)N, sizeof(int32_t));

    size_t ffn_scratch = 0;
    for (int l = 0; l < L; l++)
        if (ffn_scratch_floats(&m->ffn[l], N) > ffn_scratch) ffn_scratch = ffn_scratch_floats(&m->ffn[l], N);
    /* bf16 keeps the gradients of qkv and of the heads' outputs in bf16 (dqkv_h, datty_h) */
    m->att_threads = omp_get_max_threads();
    const size_t att_scratch =
        m->att_fused ? attention_fused_scratch_floats(T, C, m->NH, m->att_threads)
        : m->bf16    ? attention_bf16_scratch_floats(T, C, m->NH, m->att_threads)
                     : (size_t)T * T * (size_t)m->att_threads; /* a score gradient per thread */
    const size_t grad_parts[] = {nc, nc, m->bf16 ? 0 : 3 * nc, m->bf16 ? 0 : nc, att_scratch,
                                 ffn_scratch};
    size_t grad_total = 0;
    for (size_t i = 0; i < sizeof grad_parts / sizeof grad_parts[0]; i++)
        grad_total += (grad_parts[i] + 15) / 16 * 16;
    m->grad_mem = xcalloc(grad_total, sizeof(float));
    float *cur = m->grad_mem;
    m->dres = carve(&cur, nc);
    m->dln = carve(&cur, nc);
    m->dqkv = carve(&cur, grad_parts[2]);
    m->datty = carve(&cur, grad_parts[3]);
    m->datt = carve(&cur, att_scratch);
    m->dffn = carve(&cur, ffn_scratch);
    ALWAYS(cur == m->grad_mem + grad_total);
}

static void build_fp32_acts(gpt_model *m) {
    const int L = m->L, T = m->T, C = m->C, NH = m->NH, B = m->B;
    const int64_t N = m->N;
    size_t att = (size_t)B * NH * T * T, nc = (size_t)N * C, nn = (size_t)N;
    size_t per_block = 0, rest = 0;
    const size_t block_parts[] = {nc, nn, nn, 3 * nc, att, nc, nc, nc, nn, nn, nc};
    for (size_t i = 0; i < sizeof block_parts / sizeof block_parts[0]; i++)
        per_block += (block_parts[i] + 15) / 16 * 16;
    const size_t rest_parts[] = {nc, nc, nn, nn, (size_t)N * m->Vp, nn};
    for (size_t i = 0; i < sizeof rest_parts / sizeof rest_parts[0]; i++)
        rest += (rest_parts[i] + 15) / 16 * 16;
    m->act_mem = xcalloc(per_block * (size_t)L + rest, sizeof(float));
    float *cur = m->act_mem;
    m->acts = xcalloc((size_t)L, sizeof(block_acts));
    for (int l = 0; l < L; l++) {
        block_acts *a = &m->acts[l];
        a->ln1 = carve(&cur, nc);
        a->ln1_mean = carve(&cur, nn);
        a->ln1_rstd = carve(&cur, nn);
        a->qkv = carve(&cur, 3 * nc);
        a->att = carve(&cur, att);
        a->atty = carve(&cur, nc);
        a->res2 = carve(&cur, nc);
        a->ln2 = carve(&cur, nc);
        a->ln2_mean = carve(&cur, nn);
        a->ln2_rstd = carve(&cur, nn);
        a->res3 = carve(&cur, nc);
    }
    m->encoded = carve(&cur, nc);
    m->lnf = carve(&cur, nc);
    m->lnf_mean = carve(&cur, nn);
    m->lnf_rstd = carve(&cur, nn);
    m->logits = carve(&cur, (size_t)N * m->Vp);
    m->losses = carve(&cur, nn);
    ALWAYS(cur == m->act_mem + per_block * (size_t)L + rest);
}

void model_init_params(gpt_model *m, uint64_t seed) {
    tensor_init_values(&m->tensors, m->params, seed);
}

void model_set_step(gpt_model *m, int step, int64_t token_offset, int training) {
    m->ctx.step = step;
    m->ctx.token_offset = token_offset;
    m->ctx.training = training;
}

void model_set_samples(gpt_model *m, int samples, int deterministic) {
    for (int l = 0; l < m->L; l++) ffn_set_samples(&m->ffn[l], samples, deterministic);
}

void model_end_step(gpt_model *m) {
    for (int l = 0; l < m->L; l++) ffn_end_step(&m->ffn[l], &m->ctx);
}

/* The bf16 forward: the same computation with bf16 operands for the products. */
static void forward_bf16(gpt_model *m) {
    const int B = m->B, T = m->T, C = m->C, NH = m->NH;
    const int64_t N = m->N;
    const float *P = m->params;
    if (!m->wbf_fresh) bf16_from_f32(m->wbf, m->params, (int64_t)m->tensors.total);
    m->wbf_fresh = 0; /* params may change before the next forward (tests, loads) */
    const bf16 *W = m->wbf;
    const float *x = m->encoded;
    for (int l = 0; l < m->L; l++) {
        const block_offsets *o = &m->block[l];
        block_acts *a = &m->acts[l];
        layernorm_forward(m->ln_out, a->ln1_mean, a->ln1_rstd, x, P + o->ln1_w, P + o->ln1_b, N,
                          C);
        bf16_from_f32(a->ln1_h, m->ln_out, N * C);
        matmul_forward_bf16(a->qkv_h, 1, a->ln1_h, W + o->qkv_w, P + o->qkv_b, N, C, 3 * C, 0);
        if (m->att_fused)
            attention_forward_bf16_fused(a->atty_h, a->att_stats, m->datt, a->qkv_h, B, T, C, NH,
                                         m->att_threads);
        else
            attention_forward_bf16(a->atty_h, a->att_h, m->datt, a->qkv_h, B, T, C, NH,
                                   m->att_threads);
        par_copy(a->res2, x, (size_t)(N * C) * sizeof(float));
        matmul_forward_bf16(a->res2, 0, a->atty_h, W + o->proj_w, P + o->proj_b, N, C, C, 1);
        layernorm_forward(a->ln2, a->ln2_mean, a->ln2_rstd, a->res2, P + o->ln2_w, P + o->ln2_b,
                          N, C);
        par_copy(a->res3, a->res2, (size_t)(N * C) * sizeof(float));
        m->aux_loss += ffn_forward(&m->ffn[l], P, a->res3, a->ln2, N, &m->ctx);
        x = a->res3;
    }
    layernorm_forward(m->ln_out, m->lnf_mean, m->lnf_rstd, x, P + m->lnf_w, P + m->lnf_b, N, C);
    bf16_from_f32(m->lnf_h, m->ln_out, N * C);
    matmul_forward_bf16(m->logits, 0, m->lnf_h, W + m->wte, NULL, N, C, m->Vp, 0);
}

/* The fp32 forward, after the embedding: blocks, final LayerNorm, logits. */
static void forward_fp32(gpt_model *m) {
    const int B = m->B, T = m->T, C = m->C, NH = m->NH;
    const int64_t N = m->N;
    const float *P = m->params;
    const float *x = m->encoded;
    for (int l = 0; l < m->L; l++) {
        const block_offsets *o = &m->block[l];
        block_acts *a = &m->acts[l];
        layernorm_forward(a->ln1, a->ln1_mean, a->ln1_rstd, x, P + o->ln1_w, P + o->ln1_b, N, C);
        matmul_forward(a->qkv, a->ln1, P + o->qkv_w, P + o->qkv_b, N, C, 3 * C, 0);
        attention_forward(a->atty, a->att, a->qkv, B, T, C, NH);
        /* res2 = x + proj(atty): copy the residual, let the GEMM accumulate onto it */
        par_copy(a->res2, x, (size_t)(N * C) * sizeof(float));
        matmul_forward(a->res2, a->atty, P + o->proj_w, P + o->proj_b, N, C, C, 1);
        layernorm_forward(a->ln2, a->ln2_mean, a->ln2_rstd, a->res2, P + o->ln2_w, P + o->ln2_b,
                          N, C);
        par_copy(a->res3, a->res2, (size_t)(N * C) * sizeof(float));
        m->aux_loss += ffn_forward(&m->ffn[l], P, a->res3, a->ln2, N, &m->ctx);
        x = a->res3;
    }
    layernorm_forward(m->lnf, m->lnf_mean, m->lnf_rstd, x, P + m->lnf_w, P + m->lnf_b, N, C);
    matmul_forward(m->logits, m->lnf, P + m->wte, NULL, N, C, m->Vp, 0);
}

float model_forward(gpt_model *m, const int32_t *inputs, const int32_t *targets) {
    const int B = m->B, T = m->T, C = m->C;
    const int64_t N = m->N;
    const float *P = m->params;
    memcpy(m->inputs, inputs, (size_t)N * sizeof(int32_t));
    encoder_forward(m->encoded, inputs, P + m->wte, P + m->wpe, B, T, C);
    m->aux_loss = 0.0;
    if (m->bf16)
        forward_bf16(m);
    else
        forward_fp32(m);
    if (!targets) return 0.0f;
    memcpy(m->targets, targets, (size_t)N * sizeof(int32_t));
    crossentropy_forward(m->losses, m->logits, m->logits, targets, N, m->V, m->Vp);
    double sum = 0.0;
    for (int64_t i = 0; i < N; i++) sum += m->losses[i];
    m->mean_loss = (float)(sum / (double)N);
    return m->mean_loss;
}

void model_zero_grad(gpt_model *m) { par_zero(m->grads, m->tensors.total * sizeof(float)); }

void model_update(gpt_model *m, const run_config *cfg, float lr, int step, float grad_scale) {
    optim_adamw_step(&m->tensors, m->params, m->grads, m->m, m->v, cfg, lr, step, grad_scale,
                     m->bf16 ? m->wbf : NULL);
    m->wbf_fresh = m->bf16;
}

/*
 * Gradient reduction behind backward (model_backward_overlapped): the
 * replicated gradients of block l are [block[l].ln1_w, the next block's ln1_w
 * or lnf_w); the final LayerNorm's run to n_replicated; wpe's lie between wte
 * and block 0. Expert shards per layer are [shard_seg[l], shard_seg[l + 1]).
 *
 * wte (a third of GPT-2 small's gradient) is tied: the LM head's part is done
 * first, the encoder's rows only at the very end. So the rows no rank's batch
 * uses (the union of every rank's input tokens, gathered before backward) are
 * reduced right after the LM head, the whole of wte in fact; the rows some
 * batch uses are copied out first (wte_pack), the encoder adds into the copy,
 * and only the copy is reduced at the end and put back. Each element is the
 * same sum as in the blocking reduction, so the result is too, bit for bit.
 */
enum { SEG_EMBED = -1 };

/* The end of the embeddings' gradients (wte, wpe): where block 0 (or lnf) starts. */
static size_t embed_end(const gpt_model *m) { return m->L > 0 ? m->block[0].ln1_w : m->lnf_w; }

static void reduce_segment(gpt_model *m, int l, const dist_ctx *d) {
    const float inv = 1.0f / (float)d->size;
    size_t lo, hi;
    if (l == SEG_EMBED) {
        lo = 0;
        hi = embed_end(m);
    } else if (l == m->L) {
        lo = m->lnf_w;
        hi = m->n_replicated;
    } else {
        lo = m->block[l].ln1_w;
        hi = l + 1 < m->L ? m->block[l + 1].ln1_w : m->lnf_w;
        /* expert shards: summed over the shard's replicas, divided by the rank count */
        if (m->shard_seg[l + 1] > m->shard_seg[l])
            gradred_add(m->red_edp, m->grads + m->shard_seg[l], m->shard_seg[l + 1] - m->shard_seg[l],
                        inv);
    }
    gradred_add(m->red_world, m->grads + lo, hi - lo, inv);
}

/* After backward has finished block l (or lnf, l = L): start its reduction. */
static void backward_done(gpt_model *m, int l) {
    if (m->reducing) reduce_segment(m, l, m->reducing);
}

/* Between the products of backward: let the reductions in flight move on. */
static void backward_progress(gpt_model *m) {
    if (!m->reducing) return;
    gradred_progress(m->red_world);
    gradred_progress(m->red_edp);
}

/* The LM head's backward is done: copy out the rows the encoder will add to, reduce wte. */
static void lm_head_done(gpt_model *m) {
    if (!m->reducing) return;
    const int C = m->C;
    float *G = m->grads + m->wte;
#pragma omp parallel for
    for (int i = 0; i < m->wte_rows; i++)
        memcpy(m->wte_pack + (size_t)i * C, G + (size_t)m->wte_row[i] * C, (size_t)C * sizeof(float));
    gradred_add(m->red_world, G, (size_t)m->Vp * C, 1.0f / (float)m->reducing->size);
}

/* The encoder's backward: into wte and wpe, or (reducing) into the copied rows and wpe. */
static void embed_backward(gpt_model *m) {
    float *G = m->grads;
    if (!m->reducing) {
        encoder_backward(G + m->wte, G + m->wpe, m->dres, m->inputs, m->B, m->T, m->C);
        return;
    }
    encoder_backward(m->wte_pack, G + m->wpe, m->dres, m->wte_local, m->B, m->T, m->C);
    const float inv = 1.0f / (float)m->reducing->size;
    gradred_add(m->red_world, G + m->wpe, embed_end(m) - m->wpe, inv);
    gradred_add(m->red_world, m->wte_pack, (size_t)m->wte_rows * m->C, inv);
}

static void make_reducers(gpt_model *m, const dist_ctx *d) {
    if (m->red_world) return;
    /* in flight at once: about 64 MiB of buckets, at least 2 */
    size_t slots = ((size_t)64 << 20) / (m->bucket_floats * sizeof(float));
    if (slots < 2) slots = 2;
    if (slots > 256) slots = 256;
    m->red_world = gradred_create(d->world, m->bucket_floats, (int)slots);
    m->red_edp = gradred_create(d->edp_comm, m->bucket_floats, (int)slots);
}

/* The union of every rank's input tokens, in token order (the same list on every rank). */
static void gather_used_rows(gpt_model *m, const dist_ctx *d) {
    int64_t all = (int64_t)d->size * m->N;
    if (!m->wte_pack) { /* the rows a step's batches can use: at most every token of every rank */
        int64_t cap = all < m->Vp ? all : m->Vp;
        m->wte_pack = xcalloc((size_t)cap * m->C, sizeof(float));
        m->wte_row = xcalloc((size_t)cap, sizeof(int32_t));
        m->wte_local = xcalloc((size_t)m->N, sizeof(int32_t));
        m->wte_map = xcalloc((size_t)m->Vp, sizeof(int32_t));
        m->all_inputs = xcalloc((size_t)all, sizeof(int32_t));
    }
    MPI_CHECK(MPI_Allgather(m->inputs, (int)m->N, MPI_INT32_T, m->all_inputs, (int)m->N,
                            MPI_INT32_T, d->world));
    memset(m->wte_map, 0, (size_t)m->Vp * sizeof(int32_t));
    for (int64_t i = 0; i < all; i++) m->wte_map[m->all_inputs[i]] = 1;
    m->wte_rows = 0;
    for (int v = 0; v < m->Vp; v++)
        if (m->wte_map[v]) {
            m->wte_map[v] = m->wte_rows;
            m->wte_row[m->wte_rows++] = v;
        }
    for (int64_t i = 0; i < m->N; i++) m->wte_local[i] = m->wte_map[m->inputs[i]];
}

/* The bf16 backward (see forward_bf16). */
static void backward_bf16(gpt_model *m) {
    const int B = m->B, T = m->T, C = m->C, NH = m->NH;
    const int64_t N = m->N;
    const size_t nc = (size_t)(N * C) * sizeof(float);
    const float *P = m->params;
    const bf16 *W = m->wbf;
    float *G = m->grads;
    crossentropy_backward_bf16(m->dlogits_h, m->logits, m->targets, 1.0f / (float)N, N, m->V,
                               m->Vp);
    par_zero(m->dln, nc);
    matmul_backward_bf16(m->dln, 0, G + m->wte, NULL, m->dlogits_h, m->lnf_h, W + m->wte, N, C,
                         m->Vp);
    lm_head_done(m);
    const float *x_last = m->L > 0 ? m->acts[m->L - 1].res3 : m->encoded;
    par_zero(m->dres, nc);
    layernorm_backward(m->dres, G + m->lnf_w, G + m->lnf_b, m->dln, x_last, P + m->lnf_w,
                       m->lnf_mean, m->lnf_rstd, N, C);
    backward_done(m, m->L);
    for (int l = m->L - 1; l >= 0; l--) {
        const block_offsets *o = &m->block[l];
        block_acts *a = &m->acts[l];
        const float *x = l > 0 ? m->acts[l - 1].res3 : m->encoded;
        par_zero(m->dln, nc);
        ffn_backward(&m->ffn[l], P, G, m->dln, m->dres, a->ln2, N, m->dffn, &m->ctx);
        backward_progress(m);
        layernorm_backward(m->dres, G + o->ln2_w, G + o->ln2_b, m->dln, a->res2, P + o->ln2_w,
                           a->ln2_mean, a->ln2_rstd, N, C);
        bf16_from_f32(m->dres_h, m->dres, N * C);
        matmul_backward_bf16(m->datty_h, 1, G + o->proj_w, NULL, m->dres_h, a->atty_h,
                             W + o->proj_w, N, C, C);
        bias_backward(G + o->proj_b, m->dres, N, C);
        backward_progress(m);
        if (m->att_fused)
            attention_backward_bf16_fused(m->dqkv_h, m->datt, m->datty_h, a->qkv_h, a->att_stats, B,
                                          T, C, NH, m->att_threads);
        else
            attention_backward_bf16(m->dqkv_h, m->datt, m->datty_h, a->qkv_h, a->att_h, B, T, C,
                                    NH, m->att_threads);
        backward_progress(m);
        par_zero(m->dln, nc);
        matmul_backward_bf16(m->dln, 0, G + o->qkv_w, G + o->qkv_b, m->dqkv_h, a->ln1_h,
                             W + o->qkv_w, N, C, 3 * C);
        layernorm_backward(m->dres, G + o->ln1_w, G + o->ln1_b, m->dln, x, P + o->ln1_w,
                           a->ln1_mean, a->ln1_rstd, N, C);
        backward_done(m, l);
    }
    embed_backward(m);
}

void model_backward(gpt_model *m) {
    if (m->bf16) {
        backward_bf16(m);
        return;
    }
    const int B = m->B, T = m->T, C = m->C, NH = m->NH;
    const int64_t N = m->N;
    const size_t nc = (size_t)(N * C) * sizeof(float);
    const float *P = m->params;
    float *G = m->grads;
    float *dlogits = m->logits; /* probabilities become their own gradient */
    crossentropy_backward(dlogits, m->logits, m->targets, 1.0f / (float)N, N, m->V, m->Vp);
    /* logits = lnf . wte^T */
    par_zero(m->dln, nc);
    matmul_backward(m->dln, G + m->wte, NULL, dlogits, m->lnf, P + m->wte, N, C, m->Vp);
    lm_head_done(m);
    const float *x_last = m->L > 0 ? m->acts[m->L - 1].res3 : m->encoded;
    par_zero(m->dres, nc);
    layernorm_backward(m->dres, G + m->lnf_w, G + m->lnf_b, m->dln, x_last, P + m->lnf_w,
                       m->lnf_mean, m->lnf_rstd, N, C);
    backward_done(m, m->L);
    for (int l = m->L - 1; l >= 0; l--) {
        const block_offsets *o = &m->block[l];
        block_acts *a = &m->acts[l];
        const float *x = l > 0 ? m->acts[l - 1].res3 : m->encoded;
        /* res3 = res2 + FFN(LN2(res2)): dres passes through and gains the FFN's share */
        par_zero(m->dln, nc);
        ffn_backward(&m->ffn[l], P, G, m->dln, m->dres, a->ln2, N, m->dffn, &m->ctx);
        backward_progress(m);
        layernorm_backward(m->dres, G + o->ln2_w, G + o->ln2_b, m->dln, a->res2, P + o->ln2_w,
                           a->ln2_mean, a->ln2_rstd, N, C);
        /* res2 = x + proj(attn(LN1(x))) */
        par_zero(m->datty, nc);
        matmul_backward(m->datty, G + o->proj_w, G + o->proj_b, m->dres, a->atty, P + o->proj_w,
                        N, C, C);
        backward_progress(m);
        par_zero(m->dqkv, 3 * nc);
        attention_backward(m->dqkv, m->datt, m->datty, a->qkv, a->att, B, T, C, NH, m->att_threads);
        backward_progress(m);
        par_zero(m->dln, nc);
        matmul_backward(m->dln, G + o->qkv_w, G + o->qkv_b, m->dqkv, a->ln1, P + o->qkv_w, N, C,
                        3 * C);
        layernorm_backward(m->dres, G + o->ln1_w, G + o->ln1_b, m->dln, x, P + o->ln1_w,
                           a->ln1_mean, a->ln1_rstd, N, C);
        backward_done(m, l);
    }
    embed_backward(m);
}

double model_finish_reduction(gpt_model *m, const dist_ctx *d) {
    gradred_wait(m->red_world);
    gradred_wait(m->red_edp);
    if (m->wte_rows > 0) { /* the rows the encoder added to, reduced apart: put them back */
        const int C = m->C;
        float *G = m->grads + m->wte;
#pragma omp parallel for
        for (int i = 0; i < m->wte_rows; i++)
            memcpy(G + (size_t)m->wte_row[i] * C, m->wte_pack + (size_t)i * C, (size_t)C * sizeof(float));
        m->wte_rows = 0;
    }
    size_t n_rep = m->n_replicated, n_exp = m->tensors.total - m->n_replicated;
    double sq_exp = optim_sum_squares(m->grads + n_rep, n_exp);
    dist_allreduce_sum_d(&sq_exp, 1, d->ep_comm);
    return sqrt(optim_sum_squares(m->grads, n_rep) + sq_exp);
}

double model_reduce_gradients(gpt_model *m, const dist_ctx *d) {
    make_reducers(m, d);
    /* in the order model_backward_overlapped queues them */
    for (int l = m->L; l >= SEG_EMBED; l--) reduce_segment(m, l, d);
    return model_finish_reduction(m, d);
}

void model_backward_overlapped(gpt_model *m, const dist_ctx *d) {
    make_reducers(m, d);
    if (d->size > 1) {
        gather_used_rows(m, d);
        m->reducing = d;
    }
    model_backward(m);
    m->reducing = NULL;
}

double model_flops_per_token(const gpt_model *m) {
    double C = m->C, matmul = 0.0;
    for (int l = 0; l < m->L; l++) matmul += 4.0 * C * C + ffn_matmul_params_per_token(&m->ffn[l]);
    matmul += C * m->Vp; /* LM head */
    return 6.0 * matmul + 12.0 * m->L * (double)m->T * C;
}

size_t model_num_params(const gpt_model *m) {
    size_t n = 0;
    for (int i = 0; i < m->tensors.n; i++) n += m->tensors.t[i].numel;
    return n;
}

void model_free(gpt_model *m) {
    gradred_free(m->red_world);
    gradred_free(m->red_edp);
    free(m->shard_seg);
    free(m->wte_pack);
    free(m->wte_row);
    free(m->wte_local);
    free(m->wte_map);
    free(m->all_inputs);
    for (int l = 0; l < m->L; l++) ffn_free(&m->ffn[l]);
    free(m->ffn);
    free(m->block);
    free(m->acts);
    free(m->act_mem);
    free(m->bf16_mem);
    free(m->grad_mem);
    free(m->params);
    free(m->grads);
    free(m->m);
    free(m->v);
    free(m->inputs);
    free(m->targets);
    tensor_table_free(&m->tensors);
    memset(m, 0, sizeof *m);
}
