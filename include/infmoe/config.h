/*
 * config: one YAML file per run, read with libyaml into struct run_config.
 *
 * Every key has a default (docs/config.md lists them); the file and then any
 * `--set section.key=value` overrides change them. Anything wrong (unknown key,
 * wrong type, value out of range, inconsistent values, malformed YAML, a second
 * document, a NUL byte, nesting deeper than 64 levels) ends the run with one line
 * `file:line:col: message`. Checks that need the rank count
 * (batch split, ep) run later, in config_check_layout().
 */
#ifndef INFMOE_CONFIG_H
#define INFMOE_CONFIG_H

#include <stdint.h>
#include <stdio.h>

typedef enum {
    FFN_DENSE = 0, /* GPT-2 MLP: C -> hidden -> C with GELU */
    FFN_TOPK,      /* discrete MoE: E experts, k chosen per token */
    FFN_MOGE,      /* topk plus the group-sparse penalty on router probabilities */
    FFN_INFINITE,  /* ∞-MoE: Gaussian router, top-N% of one large FFN, K samples */
} ffn_kind;
/* The name of a kind as configs, logs, stats files and checkpoints spell it ("topk"). */
const char *ffn_kind_name(ffn_kind kind);

typedef enum {
    MASK_WINDOW = 0, /* dz = 1: the arc of units nearest z on a ring */
    MASK_LEARNED,    /* scores P z + q over units, top blocks */
} mask_rule;

typedef enum {
    GATE_NOISY = 0, /* Shazeer 2017: noisy top-k, softmax over the kept k */
    GATE_SWITCH,    /* Switch: softmax over all E, raw probabilities as gates */
} gate_kind;

typedef enum {
    PRECISION_FP32 = 0, /* every product in fp32 */
    PRECISION_BF16,     /* GEMMs on bf16 operands, fp32 sums, weights and optimizer */
    PRECISION_AUTO,     /* bf16 where its products outrun fp32 ones (model_precision) */
} precision_kind;
const char *precision_name(precision_kind p);

typedef enum {
    TOKENIZER_BYTE = 0, /* one token a byte (vocabulary 256) */
    TOKENIZER_GPT2,     /* GPT-2's byte-level BPE (vocabulary 50257), see bpe.h */
} tokenizer_kind;
const char *tokenizer_name(tokenizer_kind t);

typedef struct {
    /* model */
    int32_t n_layer, n_embd, n_head, seq_len, vocab_size;
    /* ffn */
    ffn_kind ffn_kind;
    int32_t ffn_hidden; /* units of the dense FFN; 0 in the file means 4 * n_embd */
    int32_t ffn_every;  /* MoE FFN in layers every-1, 2*every-1, ...; dense elsewhere */
    int32_t experts, top_k, expert_hidden; /* expert_hidden 0: ffn_hidden / top_k */
    gate_kind gate;
    float w_importance, w_load, aux_alpha, z_loss, jitter, capacity_factor;
    int32_t collapse_guard_steps;
    float collapse_margin;
    /* eval capacity (NaN in the file's absence: as capacity_factor), aux-loss-free
     * bias rate (0 off), forced even routing (0/1), width of the shared FFN (0 none) */
    float eval_capacity_factor, expert_bias_rate;
    int32_t force_balance, shared_hidden;
    /* hierarchical MoE (topk): groups of experts (0: flat routing), groups per token;
     * ffn.k is then the experts chosen in each chosen group */
    int32_t groups, group_k;
    float moge_lambda, moge_sigma_max, moge_sigma_min, moge_gamma;
    int32_t moge_convention; /* 0 mean: lambda x per-token mean; 1 official: MoGE code's sum */
    /* ∞-MoE: units H (0: 2 * hidden), keep fraction, samples K, mask rule and block,
     * window temperature, latent dimension (0: 1 for window, 8 for learned),
     * router width, KL weight */
    int32_t inf_units, samples, mask_block, latent_dim, router_hidden;
    int32_t chunk_units; /* infinite, window: units per compute chunk (whole blocks) */
    float keep, tau, kl_weight, sigma_min, balance_rate;
    mask_rule mask;
    int32_t stratified; /* ∞-MoE sampling: 0 iid draws; 1 one draw in each of K equal-probability strata */
    int32_t samples_max; /* ∞-MoE training: 0 trains at K = samples; else each step's K is drawn
                          * uniformly from samples..samples_max (evaluation stays at samples) */
    /* train */
    int32_t steps, batch_size, warmup;
    int32_t warmup_clamped_from; /* the warmup asked for when above steps (then warmup = steps), else 0 */
    float lr, min_lr, weight_decay, grad_clip, beta1, beta2, adam_eps;
    int64_t seed;
    precision_kind precision; /* as written; precision_resolve() says what runs */
    int32_t att_stored; /* bf16 attention: 0 fused (row statistics kept), 1 stored probabilities */
    int32_t log_every, eval_every, eval_batches, ckpt_every, stats_every, keep_last;
    /* data */
    char data_train[1024], data_val[1024];
    tokenizer_kind tokenizer; /* what the shards hold; sample encodes and decodes with it */
    char data_vocab[1024];    /* gpt2: the directory of encoder.json and vocab.bpe */
    /* parallel: expert group size; the all-to-all's scheme (0 flat, 1 node-aware) and
     * its chunks (MoE: exchanges split by groups of a rank's experts, pipelined with
     * their GEMMs); the gradient reduction (0 after backward, 1 overlapped with it) and
     * its bucket size */
    int32_t ep, alltoall_node, alltoall_chunks, grad_overlap;
    float grad_bucket_mb;
    /* output */
    char output_dir[1024];
    /* provenance: the file it came from and its full text plus overrides */
    char path[1024];
    char *text;
} run_config;

/* Defaults for every key (data.train left empty: it is required). */
void config_defaults(run_config *cfg);

/*
 * Load `path`, apply `n_sets` overrides of the form "section.key=value", fill
 * derived defaults and validate. On any error prints one line and exits with
 * status 1 (before MPI is up, every rank prints the same; callers print on rank
 * 0 only by passing quiet=1 on the others).
 */
void config_load(run_config *cfg, const char *path, int n_sets, char **sets, int quiet);

/* Same as config_load but from text already in memory (tests, checkpoints). */
void config_load_text(run_config *cfg, const char *name, const char *text, int n_sets,
                      char **sets, int quiet);

/* Checks that need the number of ranks: batch split and expert-parallel groups. */
void config_check_layout(const run_config *cfg, int nranks, int quiet);
/* The part of it that eval and sample need: parallel.ep divides the ranks. */
void config_check_ep(const run_config *cfg, int nranks, int quiet);

/* Free what config_load allocated. */
void config_free(run_config *cfg);

/*
 * The effective config as YAML (malloc'd): every key with the value it runs
 * with, derived defaults filled in; unset paths are left out. Loading the text
 * gives the same config bit for bit: paths are quoted and escaped by libyaml,
 * floats keep the digits that parse back to the same float.
 */
char *config_resolved_text(const run_config *cfg);
/* Write config_resolved_text(cfg) to f. */
void config_print(const run_config *cfg, FILE *f);

/*
 * Whether an architecture key (model shape, FFN kind and the kind's shape keys)
 * differs between a and b: 1 with the first such key ("section.key") in key and
 * both values as text in va and vb, or 0. Keys of FFN kinds other than a's are
 * not compared. Each buffer holds cap bytes.
 */
int config_arch_mismatch(const run_config *a, const run_config *b, char *key, char *va, char *vb,
                         size_t cap);

#endif
