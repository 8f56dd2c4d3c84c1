/* infer: infmoe eval and infmoe sample (see infer.h). */
#define _POSIX_C_SOURCE 200809L
#include "infmoe/infer.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/bpe.h"
#include "infmoe/ckpt.h"
#include "infmoe/config.h"
#include "infmoe/data.h"
#include "infmoe/dist.h"
#include "infmoe/ffn.h"
#include "infmoe/gemm.h"
#include "infmoe/model.h"
#include "infmoe/util.h"

/* Value of option `name` (--name VALUE), or NULL. */
static const char *option(int argc, char **argv, const char *name) {
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], name) == 0) return argv[i + 1];
    return NULL;
}

/* Option `name` of command `cmd` as an integer in [min, max] (def when absent); anything
 * else ends the job with one line naming the flag and the range. */
static int64_t option_int(int argc, char **argv, const char *cmd, const char *name, int64_t def,
                          int64_t min, int64_t max) {
    const char *v = option(argc, argv, name);
    int64_t x = def;
    char err[256];
    if (v && parse_int_arg(name, v, min, max, &x, err, sizeof err) < 0)
        infmoe_die_all("%s: %s", cmd, err);
    return x;
}

/* Check that every argument is a known option (with a value) or the one positional. */
static const char *positional(int argc, char **argv, const char *const *known, const char *cmd) {
    const char *pos = NULL;
    for (int i = 1; i < argc; i++) {
        if (argv[i][0] == '-') {
            int ok = 0;
            for (int k = 0; known[k]; k++) ok |= strcmp(argv[i], known[k]) == 0;
            if (!ok || i + 1 >= argc)
                infmoe_die_all("%s: unknown option or missing value: %s (see infmoe %s --help)", cmd, argv[i], cmd);
            i++;
        } else if (!pos) {
            pos = argv[i];
        } else {
            infmoe_die_all("%s: unexpected argument '%s'", cmd, argv[i]);
        }
    }
    if (!pos) infmoe_die_all("%s: no checkpoint given (see infmoe %s --help)", cmd, cmd);
    return pos;
}

/* Config of the checkpoint, the model built for this job's layout, the weights loaded. */
static void load_model(const char *arg, int B, int ep, dist_ctx *d, run_config *cfg, gpt_model *m,
                       char *path, size_t cap, ckpt_position *pos) {
    ckpt_resolve(arg, ".", path, cap);
    char *text = ckpt_config_text(path);
    /* the checkpoint's config with this job's ep: config checks what ep must divide */
    char set_ep[48];
    snprintf(set_ep, sizeof set_ep, "parallel.ep=%d", ep);
    char *sets[1] = {set_ep};
    config_load_text(cfg, path, text, 1, sets, d->rank != 0);
    free(text);
    config_check_ep(cfg, d->size, d->rank != 0);
    dist_set_layout(d, cfg->ep);
    model_build(m, cfg, B, d);
    *pos = ckpt_load(path, m, cfg, d);
}

int infer_eval_main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "--help") == 0) {
        printf("usage: infmoe eval CKPT [--data SHARDS] [--batches N] [--batch B] [--ep EP]\n"
               "                  [--samples K | --deterministic]\n"
               "\n"
               "Validation loss of checkpoint CKPT (a step_NNNNNN directory or a run's 'latest')\n"
               "over N global batches of B sequences (defaults: the checkpoint's data.val,\n"
               "train.eval_batches and train.batch_size), on the ranks of the MPI job.\n"
               "∞-MoE models: --samples K draws K samples per token (default: ffn.samples of\n"
               "training); --deterministic uses the single sample z = mu.\n");
        return 0;
    }
    dist_ctx d;
    dist_init(&d, &argc, &argv);
    /* --deterministic takes no value: note it and drop it before the option parser */
    int deterministic = 0;
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--deterministic") == 0) {
            deterministic = 1;
            for (int j = i; j + 1 < argc; j++) argv[j] = argv[j + 1];
            argc--;
            i--;
        }
    const char *known[] = {"--data", "--batches", "--batch", "--ep", "--samples", NULL};
    const char *arg = positional(argc, argv, known, "eval");
    run_config cfg;
    gpt_model m;
    char path[2048];
    ckpt_position pos;
    /* the batch must be known before the model is built: read the config first */
    char probe[2048];
    ckpt_resolve(arg, ".", probe, sizeof probe);
    char *text = ckpt_config_text(probe);
    config_load_text(&cfg, probe, text, 0, NULL, d.rank != 0);
    free(text);
    /* the ranges of train.batch_size, train.eval_batches and ffn.samples */
    int batch = (int)option_int(argc, argv, "eval", "--batch", cfg.batch_size, 1, 1 << 24);
    int batches = (int)option_int(argc, argv, "eval", "--batches", cfg.eval_batches, 1, INT_MAX);
    int samples = (int)option_int(argc, argv, "eval", "--samples", cfg.samples, 1, 1024);
    if ((deterministic || option(argc, argv, "--samples")) && !ffn_kind_has_samples(cfg.ffn_kind))
        infmoe_die_all("eval: --samples and --deterministic apply to ∞-MoE models (ffn.kind: infinite)");
    const char *data = option(argc, argv, "--data");
    if (!data) data = cfg.data_val[0] ? cfg.data_val : NULL;
    if (!data) infmoe_die_all("eval: the checkpoint's config has no data.val: give --data SHARDS");
    if (batch % d.size) infmoe_die_all("eval: --batch %d must be divisible by the rank count %d", batch, d.size);
    char data_path[1024];
    snprintf(data_path, sizeof data_path, "%s", data);
    config_free(&cfg);
    int B = batch / d.size;
    load_model(arg, B, (int)option_int(argc, argv, "eval", "--ep", 1, 1, 1 << 20), &d, &cfg, &m, path,
               sizeof path, &pos);
    model_set_samples(&m, samples, deterministic);
    token_dataset ds;
    data_open(&ds, data_path, cfg.seq_len, cfg.vocab_size, (uint64_t)cfg.seed, cfg.tokenizer);
    int32_t *in = xcalloc((size_t)B * cfg.seq_len, sizeof(int32_t));
    int32_t *tg = xcalloc((size_t)B * cfg.seq_len, sizeof(int32_t));
    double sum = 0.0, t0 = wall_time();
    for (int b = 0; b < batches; b++) {
        uint64_t first = (uint64_t)b * batch + (uint64_t)d.rank * B;
        data_eval_batch(&ds, first, B, in, tg);
        /* routing draws keyed by the global token, so any rank count samples alike */
        model_set_step(&m, (int)pos.step, (int64_t)first * cfg.seq_len, 0);
        sum += model_forward(&m, in, tg);
    }
    dist_allreduce_sum_d(&sum, 1, d.world);
    char mode[48] = "";
    if (ffn_kind_has_samples(cfg.ffn_kind)) {
        if (deterministic) snprintf(mode, sizeof mode, " | samples deterministic");
        else snprintf(mode, sizeof mode, " | samples %d", samples);
    }
    dist_log("eval %s | step %lld | val_loss %.6f%s | %d batches x %d sequences | ranks %d | %.2f s\n",
             path, (long long)pos.step, sum / ((double)batches * d.size), mode, batches, batch,
             d.size, wall_time() - t0);
    free(in);
    free(tg);
    data_close(&ds);
    model_free(&m);
    config_free(&cfg);
    gemm_shutdown();
    dist_finalize(&d);
    return 0;
}

int infer_sample_main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "--help") == 0) {
        printf("usage: infmoe sample CKPT --prompt TEXT [--tokens N] [--temperature T]\n"
               "                    [--seed S] [--ep EP] [--vocab DIR]\n"
               "\n"
               "Continue TEXT with N tokens (default 200) sampled from checkpoint CKPT at\n"
               "temperature T (default 0.8; 0 = greedy). The checkpoint's data.tokenizer says\n"
               "how: byte-level models read and print bytes; gpt2 models encode the prompt and\n"
               "decode tokens with GPT-2's BPE, from data.vocab or --vocab DIR. A byte-level\n"
               "config with a larger vocabulary prints token ids. Every rank runs the same\n"
               "sequence.\n");
        return 0;
    }
    dist_ctx d;
    dist_init(&d, &argc, &argv);
    const char *known[] = {"--prompt", "--tokens", "--temperature", "--seed", "--ep", "--vocab", NULL};
    const char *arg = positional(argc, argv, known, "sample");
    const char *prompt = option(argc, argv, "--prompt");
    if (!prompt || !prompt[0]) infmoe_die_all("sample: give a non-empty --prompt TEXT");
    int n_new = (int)option_int(argc, argv, "sample", "--tokens", 200, 0, 1 << 24);
    const char *tv = option(argc, argv, "--temperature");
    double temperature = 0.8;
    char err[256];
    if (tv && parse_float_arg("--temperature", tv, 0, 1000, &temperature, err, sizeof err) < 0)
        infmoe_die_all("sample: %s", err);
    uint64_t seed = (uint64_t)option_int(argc, argv, "sample", "--seed", 1, 0, INT64_MAX);
    run_config cfg;
    gpt_model m;
    char path[2048];
    ckpt_position pos;
    load_model(arg, 1, (int)option_int(argc, argv, "sample", "--ep", 1, 1, 1 << 20), &d, &cfg, &m,
               path, sizeof path, &pos);
    const int T = cfg.seq_len, V = cfg.vocab_size, bytes = V <= 256;
    bpe_vocab *bpe = NULL;
    bpe_tokens ptok = {0};
    size_t len = strlen(prompt);
    if (cfg.tokenizer == TOKENIZER_GPT2) {
        const char *dir = option(argc, argv, "--vocab") ? option(argc, argv, "--vocab") : cfg.data_vocab;
        char why[1024];
        if (!(bpe = bpe_load(dir, why, sizeof why)))
            infmoe_die_all("sample: the checkpoint's tokenizer is gpt2: %s (or give --vocab DIR)", why);
        bpe_encoder *enc = bpe_encoder_new(bpe);
        bpe_encode(enc, prompt, len, &ptok);
        bpe_encoder_free(enc);
        len = ptok.n;
    }
    size_t cap = len + (size_t)n_new + 1;
    int32_t *seq = xcalloc(cap, sizeof(int32_t)), *window = xcalloc((size_t)T, sizeof(int32_t));
    for (size_t i = 0; i < len; i++) {
        seq[i] = bpe ? ptok.ids[i] : (unsigned char)prompt[i];
        if (seq[i] >= V) infmoe_die_all("sample: prompt token %d is outside the vocabulary (%d)", seq[i], V);
    }
    bpe_tokens_free(&ptok);
    if (d.rank == 0) {
        if (bytes || bpe) fputs(prompt, stdout);
        else for (size_t i = 0; i < len; i++) printf("%d ", seq[i]);
        fflush(stdout);
    }
    rng_state r;
    rng_seed(&r, seed);
    float *p = xcalloc((size_t)V, sizeof(float));
    for (int k = 0; k < n_new; k++) {
        /* the last T tokens; positions after the end are padding the causal mask ignores */
        size_t n = len + (size_t)k, s0 = n > (size_t)T ? n - (size_t)T : 0, w = n - s0;
        memset(window, 0, sizeof(int32_t) * (size_t)T);
        memcpy(window, seq + s0, sizeof(int32_t) * w);
        model_set_step(&m, (int)pos.step, 0, 0);
        model_forward(&m, window, NULL);
        const float *lg = m.logits + (w - 1) * (size_t)m.Vp;
        int next = 0;
        if (temperature == 0) {
            for (int i = 1; i < V; i++)
                if (lg[i] > lg[next]) next = i;
        } else {
            float max = lg[0];
            for (int i = 1; i < V; i++) max = lg[i] > max ? lg[i] : max;
            double sum = 0.0;
            for (int i = 0; i < V; i++) sum += p[i] = expf((float)((lg[i] - max) / temperature));
            double u = rng_uniform(&r) * sum, c = 0.0;
            for (next = 0; next < V - 1; next++)
                if ((c += p[next]) > u) break;
        }
        seq[len + (size_t)k] = next;
        if (d.rank == 0) {
            size_t n_bytes;
            if (bpe && next < bpe_vocab_size(bpe)) fwrite(bpe_token_bytes(bpe, next, &n_bytes), 1, n_bytes, stdout);
            else if (bytes) putchar(next);
            else printf("%d ", next);
            fflush(stdout);
        }
    }
    if (d.rank == 0) putchar('\n');
    bpe_free(bpe);
    free(p);
    free(seq);
    free(window);
    model_free(&m);
    config_free(&cfg);
    gemm_shutdown();
    dist_finalize(&d);
    return 0;
}
