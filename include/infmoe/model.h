/*
 * model: a GPT-2 pre-LN decoder assembled from ops and ffn over flat buffers.
 *
 *   x = wte[tokens] + wpe[t]
 *   for each block: x += Attn(LN1(x)); x += FFN(LN2(x))
 *   logits = LNf(x) . wte^T   (tied embeddings; vocabulary padded to Vp)
 *   loss = mean cross-entropy over the tokens
 *
 * Parameters, gradients and AdamW's m and v are four buffers laid out by one
 * tensor table (see tensor.h); activations are one more buffer for the local
 * micro-batch of B sequences of T tokens. Nothing is allocated after build.
 * Replicated tensors come first ([0, n_replicated)), expert-sharded ones after,
 * each over its communicator, a layer's worth at a time (gradreduce.h).
 * The loss the model minimises is the mean cross-entropy plus every MoE layer's
 * aux loss.
 */
#ifndef INFMOE_MODEL_H
#define INFMOE_MODEL_H

#include <stdint.h>

#include "infmoe/bf16.h"
#include "infmoe/config.h"
#include "infmoe/dist.h"
#include "infmoe/ffn.h"
#include "infmoe/gradreduce.h"
#include "infmoe/tensor.h"

typedef struct {
    size_t ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b;
} block_offsets;

typedef struct {
    float *ln1, *ln1_mean, *ln1_rstd; /* (N,C), (N), (N) */
    float *qkv;                       /* (N,3C) */
    float *att;                       /* (B,NH,T,T) softmax probabilities */
    float *atty;                      /* (N,C) heads' outputs */
    float *res2;                      /* (N,C) x after attention */
    float *ln2, *ln2_mean, *ln2_rstd; /* (N,C), (N), (N) */
    float *res3;                      /* (N,C) x after the FFN */
    /* bf16 precision: what only feeds products is kept in bf16 instead (the fp32
     * ln1, qkv, att and atty above are then NULL) */
    bf16 *ln1_h, *qkv_h, *att_h, *atty_h;
    float *att_stats;                 /* bf16 fused attention: (B,NH,T,2) row max and 1/sum (att_h NULL) */
} block_acts;

typedef struct {
    int L, C, NH, T, V, Vp, B; /* B: local sequences per step */
    int64_t N;                 /* B * T */
    tensor_table tensors;
    size_t wte, wpe, lnf_w, lnf_b;
    block_offsets *block;
    ffn_layer *ffn;
    float *params, *grads, *m, *v; /* tensors.total floats each */
    /* activations */
    float *act_mem;
    block_acts *acts;
    float *encoded;                   /* (N,C) */
    float *lnf, *lnf_mean, *lnf_rstd; /* (N,C), (N), (N) */
    float *logits;                    /* (N,Vp): logits, then probs, then dlogits */
    float *losses;                    /* (N) */
    int32_t *inputs, *targets;        /* (N) copies of the batch */
    /* backward scratch, shared by all blocks */
    float *grad_mem;
    float *dres, *dln, *dqkv, *datty, *datt, *dffn;
    /* bf16 precision (bf16 set): the weights in bf16, and bf16 activations and
     * gradients that only feed products */
    int bf16;
    bf16 *wbf;            /* tensors.total: params rounded to bf16 */
    int wbf_fresh;        /* wbf was written by the last model_update (no cast needed) */
    void *bf16_mem;
    float *ln_out;        /* (N,C) fp32 LayerNorm output before its bf16 rounding */
    bf16 *lnf_h, *dlogits_h, *dres_h, *datty_h, *dqkv_h;
    int att_fused;        /* bf16 attention keeps row statistics, not probabilities */
    int att_threads;      /* threads the bf16 attention scratch (datt) is sized for */
    float mean_loss;      /* mean cross-entropy of the last forward with targets */
    double aux_loss;      /* sum of the MoE layers' aux losses (training forwards) */
    size_t n_replicated;  /* floats of the replicated region; the rest is expert-sharded */
    ffn_context ctx;      /* the step the FFN layers run in */
    /* gradient reduction: layer l's expert-sharded gradients are [shard_seg[l], shard_seg[l+1]);
     * the reducers over world (replicated) and edp (expert shards), made on first use */
    size_t *shard_seg;
    size_t bucket_floats;
    grad_reducer *red_world, *red_edp;
    const dist_ctx *reducing; /* set while model_backward_overlapped runs */
    /* wte rows some rank's batch uses (wte_rows of them, ascending: wte_row), their
     * gradients while the rest of wte is reduced (wte_pack), this rank's tokens as
     * indices into that list (wte_local); scratch: wte_map (Vp), all_inputs (ranks x N) */
    float *wte_pack;
    int32_t *wte_row, *wte_local, *wte_map, *all_inputs;
    int wte_rows;
} gpt_model;

/*
 * The precision cfg asks for on this machine: PRECISION_FP32 or PRECISION_BF16,
 * or -1 with a message in msg when bf16 is asked for and the CPU lacks AVX-512
 * BF16. auto is bf16 where oneDNN runs bf16 natively and its products are faster:
 * AMX, or AVX-512 BF16 dot products measured at >= 1.25x the fp32 FMA rate (Zen 4
 * and 5: ~2x; Intel cores without AMX: ~0.5x, so fp32 there). model_build makes
 * every rank take rank 0's measurement. Any ONEDNN_MAX_CPU_ISA limit counts (it is
 * what oneDNN will run).
 */
int model_precision(const run_config *cfg, char *msg, size_t cap);
/* Why auto chose what it did, for the log: "auto: ..." (measures on first use). */
void model_precision_auto_note(char *buf, size_t cap);
/* Whether auto would choose bf16 here (bf16 products faster than fp32 ones). */
int model_bf16_pays(void);

/*
 * Size the model from cfg for B local sequences and allocate every buffer.
 * d gives the expert-parallel layout; NULL means one process (dense models,
 * or B = 0). With B = 0 only the tensor table is built, nothing is allocated:
 * with d NULL (ep 1) its shapes are the global ones, as checkpoints store them.
 */
void model_build(gpt_model *m, const run_config *cfg, int B, const dist_ctx *d);
/*
 * The step the next forward belongs to: its index, the global index of this
 * rank's first token (for per-token noise that does not depend on the rank
 * count) and whether it trains (noise, jitter, aux losses) or evaluates.
 */
void model_set_step(gpt_model *m, int step, int64_t token_offset, int training);
/* ∞-MoE: samples per token from now on (the inference knob), or deterministic z = mu. */
void model_set_samples(gpt_model *m, int samples, int deterministic);
/* After a training step's update (advances per-layer state such as the collapse guard). */
void model_end_step(gpt_model *m);
/* GPT-2 init from seed: N(0, 0.02), residual projections / sqrt(2L), LN 1 and 0. */
void model_init_params(gpt_model *m, uint64_t seed);
/*
 * Forward pass over inputs (B,T). With targets, computes the losses and returns
 * their mean (and leaves probabilities for backward); with targets NULL, leaves
 * the logits in m->logits and returns 0.
 */
float model_forward(gpt_model *m, const int32_t *inputs, const int32_t *targets);
void model_zero_grad(gpt_model *m);
/* The optimizer step (optim_adamw_step) and, in bf16, the bf16 weights in the same pass. */
void model_update(gpt_model *m, const run_config *cfg, float lr, int step, float grad_scale);
/*
 * Backward of the last forward's loss (mean cross-entropy + aux losses; the
 * forward must have had targets). Accumulates into grads; averaging over ranks
 * is the caller's.
 */
void model_backward(gpt_model *m);
/*
 * Average one step's gradients over the ranks and return their global norm.
 * Replicated tensors: mean over all ranks. Expert shards: each rank of an
 * expert group has summed the contributions of the group's tokens, so they are
 * summed over the shard's replicas (edp) and divided by the rank count.
 */
double model_reduce_gradients(gpt_model *m, const dist_ctx *d);
/*
 * model_backward with each layer's gradients reduced (gradreduce.h) while the
 * layers below it are still in backward; model_finish_reduction then waits for
 * what is left and returns the norm. Together: model_backward plus
 * model_reduce_gradients bit for bit, with less time waiting.
 */
void model_backward_overlapped(gpt_model *m, const dist_ctx *d);
double model_finish_reduction(gpt_model *m, const dist_ctx *d);
/* Training FLOPs per token (DESIGN.md 6): 6 x matmul params + 12 L T C. */
double model_flops_per_token(const gpt_model *m);
/* Parameters in the model (alignment gaps excluded). */
size_t model_num_params(const gpt_model *m);
void model_free(gpt_model *m);

#endif
