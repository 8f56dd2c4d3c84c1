/* model: GPT-2 forward and backward over flat buffers (see model.h). */
#include "infmoe/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/ops.h"
#include "infmoe/optim.h"
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

void model_build(gpt_model *m, const run_config *cfg, int B, const dist_ctx *d) {
    memset(m, 0, sizeof *m);
    ffn_context *ctx = &m->ctx;
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
    const int L = m->L, C = m->C, T = m->T, NH = m->NH;
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
        ffn_init(&m->ffn[l], cfg, l, tab, N, d ? ctx : NULL);
    }
    m->lnf_w = add(tab, "lnf.w", 0, 1, C, 0, 0, INIT_CONST, 1.0f);
    m->lnf_b = add(tab, "lnf.b", 0, 1, C, 0, 0, INIT_ZERO, 0);
    m->n_replicated = (tab->total + 15) / 16 * 16;
    for (int l = 0; l < L; l++) ffn_register_sharded(&m->ffn[l], tab);
    if (tab->total < m->n_replicated) tab->total = m->n_replicated;
    if (B == 0) return; /* the tensor table alone: global shapes for checkpoint tools */

    size_t P = tab->total;
    m->params = xcalloc(P, sizeof(float));
    m->grads = xcalloc(P, sizeof(float));
    m->m = xcalloc(P, sizeof(float));
    m->v = xcalloc(P, sizeof(float));

    /* Activations: one buffer, sized by the same carving it is then cut with. */
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

    m->inputs = xcalloc((size_t)N, sizeof(int32_t));
    m->targets = xcalloc((size_t)N, sizeof(int32_t));

    size_t ffn_scratch = 0;
    for (int l = 0; l < L; l++)
        if (ffn_scratch_floats(&m->ffn[l], N) > ffn_scratch) ffn_scratch = ffn_scratch_floats(&m->ffn[l], N);
    const size_t grad_parts[] = {nc, nc, 3 * nc, nc, (size_t)T * T, ffn_scratch};
    size_t grad_total = 0;
    for (size_t i = 0; i < sizeof grad_parts / sizeof grad_parts[0]; i++)
        grad_total += (grad_parts[i] + 15) / 16 * 16;
    m->grad_mem = xcalloc(grad_total, sizeof(float));
    cur = m->grad_mem;
    m->dres = carve(&cur, nc);
    m->dln = carve(&cur, nc);
    m->dqkv = carve(&cur, 3 * nc);
    m->datty = carve(&cur, nc);
    m->datt = carve(&cur, (size_t)T * T);
    m->dffn = carve(&cur, ffn_scratch);
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

float model_forward(gpt_model *m, const int32_t *inputs, const int32_t *targets) {
    const int B = m->B, T = m->T, C = m->C, NH = m->NH;
    const int64_t N = m->N;
    const float *P = m->params;
    memcpy(m->inputs, inputs, (size_t)N * sizeof(int32_t));
    encoder_forward(m->encoded, inputs, P + m->wte, P + m->wpe, B, T, C);
    const float *x = m->encoded;
    m->aux_loss = 0.0;
    for (int l = 0; l < m->L; l++) {
        const block_offsets *o = &m->block[l];
        block_acts *a = &m->acts[l];
        layernorm_forward(a->ln1, a->ln1_mean, a->ln1_rstd, x, P + o->ln1_w, P + o->ln1_b, N, C);
        matmul_forward(a->qkv, a->ln1, P + o->qkv_w, P + o->qkv_b, N, C, 3 * C, 0);
        attention_forward(a->atty, a->att, a->qkv, B, T, C, NH);
        /* res2 = x + proj(atty): copy the residual, let the GEMM accumulate onto it */
        memcpy(a->res2, x, (size_t)(N * C) * sizeof(float));
        matmul_forward(a->res2, a->atty, P + o->proj_w, P + o->proj_b, N, C, C, 1);
        layernorm_forward(a->ln2, a->ln2_mean, a->ln2_rstd, a->res2, P + o->ln2_w, P + o->ln2_b,
                          N, C);
        memcpy(a->res3, a->res2, (size_t)(N * C) * sizeof(float));
        m->aux_loss += ffn_forward(&m->ffn[l], P, a->res3, a->ln2, N, &m->ctx);
        x = a->res3;
    }
    layernorm_forward(m->lnf, m->lnf_mean, m->lnf_rstd, x, P + m->lnf_w, P + m->lnf_b, N, C);
    matmul_forward(m->logits, m->lnf, P + m->wte, NULL, N, C, m->Vp, 0);
    if (!targets) return 0.0f;
    memcpy(m->targets, targets, (size_t)N * sizeof(int32_t));
    crossentropy_forward(m->losses, m->logits, m->logits, targets, N, m->V, m->Vp);
    double sum = 0.0;
    for (int64_t i = 0; i < N; i++) sum += m->losses[i];
    m->mean_loss = (float)(sum / (double)N);
    return m->mean_loss;
}

void model_zero_grad(gpt_model *m) { memset(m->grads, 0, m->tensors.total * sizeof(float)); }

void model_backward(gpt_model *m) {
    const int B = m->B, T = m->T, C = m->C, NH = m->NH;
    const int64_t N = m->N;
    const size_t nc = (size_t)(N * C) * sizeof(float);
    const float *P = m->params;
    float *G = m->grads;
    float *dlogits = m->logits; /* probabilities become their own gradient */
    crossentropy_backward(dlogits, m->logits, m->targets, 1.0f / (float)N, N, m->V, m->Vp);
    /* logits = lnf . wte^T */
    memset(m->dln, 0, nc);
    matmul_backward(m->dln, G + m->wte, NULL, dlogits, m->lnf, P + m->wte, N, C, m->Vp);
    const float *x_last = m->L > 0 ? m->acts[m->L - 1].res3 : m->encoded;
    memset(m->dres, 0, nc);
    layernorm_backward(m->dres, G + m->lnf_w, G + m->lnf_b, m->dln, x_last, P + m->lnf_w,
                       m->lnf_mean, m->lnf_rstd, N, C);
    for (int l = m->L - 1; l >= 0; l--) {
        const block_offsets *o = &m->block[l];
        block_acts *a = &m->acts[l];
        const float *x = l > 0 ? m->acts[l - 1].res3 : m->encoded;
        /* res3 = res2 + FFN(LN2(res2)): dres passes through and gains the FFN's share */
        memset(m->dln, 0, nc);
        ffn_backward(&m->ffn[l], P, G, m->dln, m->dres, a->ln2, N, m->dffn, &m->ctx);
        layernorm_backward(m->dres, G + o->ln2_w, G + o->ln2_b, m->dln, a->res2, P + o->ln2_w,
                           a->ln2_mean, a->ln2_rstd, N, C);
        /* res2 = x + proj(attn(LN1(x))) */
        memset(m->datty, 0, nc);
        matmul_backward(m->datty, G + o->proj_w, G + o->proj_b, m->dres, a->atty, P + o->proj_w,
                        N, C, C);
        memset(m->dqkv, 0, 3 * nc);
        attention_backward(m->dqkv, m->datt, m->datty, a->qkv, a->att, B, T, C, NH);
        memset(m->dln, 0, nc);
        matmul_backward(m->dln, G + o->qkv_w, G + o->qkv_b, m->dqkv, a->ln1, P + o->qkv_w, N, C,
                        3 * C);
        layernorm_backward(m->dres, G + o->ln1_w, G + o->ln1_b, m->dln, x, P + o->ln1_w,
                           a->ln1_mean, a->ln1_rstd, N, C);
    }
    encoder_backward(G + m->wte, G + m->wpe, m->dres, m->inputs, B, T, C);
}

double model_reduce_gradients(gpt_model *m, const dist_ctx *d) {
    size_t n_rep = m->n_replicated, n_exp = m->tensors.total - m->n_replicated;
    dist_allreduce_mean(m->grads, n_rep, d->world);
    if (n_exp > 0) {
        float *g = m->grads + n_rep;
        MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, g, (int)n_exp, MPI_FLOAT, MPI_SUM, d->edp_comm));
        float inv = 1.0f / (float)d->size;
        for (size_t i = 0; i < n_exp; i++) g[i] *= inv;
    }
    double sq_exp = optim_sum_squares(m->grads + n_rep, n_exp);
    dist_allreduce_sum_d(&sq_exp, 1, d->ep_comm);
    return sqrt(optim_sum_squares(m->grads, n_rep) + sq_exp);
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
    for (int l = 0; l < m->L; l++) ffn_free(&m->ffn[l]);
    free(m->ffn);
    free(m->block);
    free(m->acts);
    free(m->act_mem);
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
