/* infer: infmoe eval and infmoe sample (see infer.h). */
#define _POSIX_C_SOURCE 200809L
#include "infmoe/infer.h"

#include <errno.h>
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
#include "infmoe/mceval.h"
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
static void load_model(const char *arg, int B, int ep, const char *extra_set, dist_ctx *d,
                       run_config *cfg, gpt_model *m, char *path, size_t cap, ckpt_position *pos) {
    ckpt_resolve(arg, ".", path, cap);
    char *text = ckpt_config_text(path);
    /* the checkpoint's config with this job's ep: config checks what ep must divide */
    char set_ep[48];
    snprintf(set_ep, sizeof set_ep, "parallel.ep=%d", ep);
    /* the exchange in one piece: the chunks the run trained with need not fit this
     * job's ep (they are a speed setting, the results are the same) */
    char one_piece[] = "parallel.alltoall_chunks=1";
    char *sets[3] = {set_ep, one_piece, (char *)extra_set};
    config_load_text(cfg, path, text, extra_set ? 3 : 2, sets, d->rank != 0);
    free(text);
    config_check_ep(cfg, d->size, d->rank != 0);
    dist_set_layout(d, cfg->ep);
    model_build(m, cfg, B, d);
    *pos = ckpt_load(path, m, cfg, d);
}

/* One evaluation setting's figures. */
typedef struct {
    double loss, secs, tokens;   /* validation: mean loss, wall seconds, tokens (all ranks) */
    double ffn_secs;             /* the FFN layers' phase time, slowest rank */
    double ffn_phase[4];         /* of which route, dispatch, all-to-all, units (slowest rank each) */
    double ffn_flops;            /* FFN FLOPs per token as run (forward) */
    int mc_right, mc_right_norm; /* multiple choice: right answers by summed and mean loss */
    double mc_secs;
} eval_result;

/* The FFN layers' cumulative seconds per phase (route, dispatch, all-to-all, units). */
static void ffn_phases(const gpt_model *m, double t[4]) {
    t[0] = t[1] = t[2] = t[3] = 0;
    for (int l = 0; l < m->L; l++) {
        double p[4];
        ffn_phase_times(&m->ffn[l], p);
        for (int i = 0; i < 4; i++) t[i] += p[i];
    }
}

static double ffn_flops_per_token(const gpt_model *m) {
    double f = 0;
    for (int l = 0; l < m->L; l++) f += 2.0 * ffn_active_params_per_token(&m->ffn[l]);
    return f;
}

static void eval_setting(gpt_model *m, const dist_ctx *d, token_dataset *ds, int batches, int batch, int step,
                         const mc_set *mc, eval_result *r) {
    const int B = m->B, T = m->T;
    memset(r, 0, sizeof *r);
    double f0[4], flops = 0;
    ffn_phases(m, f0);
    int forwards = 0;
    if (ds) {
        int32_t *in = xcalloc((size_t)B * T, sizeof(int32_t)), *tg = xcalloc((size_t)B * T, sizeof(int32_t));
        double sum = 0.0, t0 = wall_time();
        for (int b = 0; b < batches; b++) {
            uint64_t first = (uint64_t)b * batch + (uint64_t)d->rank * B;
            data_eval_batch(ds, first, B, in, tg);
            /* routing draws keyed by the global token, so any rank count samples alike */
            model_set_step(m, step, (int64_t)first * T, 0);
            sum += model_forward(m, in, tg);
            flops += ffn_flops_per_token(m);
            forwards++;
        }
        dist_allreduce_sum_d(&sum, 1, d->world);
        r->loss = sum / ((double)batches * d->size);
        r->secs = wall_time() - t0;
        r->tokens = (double)batches * batch * T;
        free(in);
        free(tg);
    }
    if (mc) {
        double t0 = wall_time();
        mc_evaluate(m, mc, d, step, &r->mc_right, &r->mc_right_norm);
        r->mc_secs = wall_time() - t0;
        if (!ds) flops += ffn_flops_per_token(m), forwards++;
    }
    double f1[4];
    ffn_phases(m, f1);
    double slow[6] = {forwards ? flops / forwards : 0, 0};
    for (int i = 0; i < 4; i++) slow[1] += f1[i] - f0[i], slow[2 + i] = f1[i] - f0[i];
    dist_allreduce_max_d(slow, 6, d->world);
    r->ffn_flops = slow[0];
    r->ffn_secs = slow[1];
    for (int i = 0; i < 4; i++) r->ffn_phase[i] = slow[2 + i];
}

/* "1,2,4,8,det" -> samples (0: deterministic); returns the count */
static int parse_sweep(const char *s, int *k, int cap) {
    int n = 0;
    char buf[256];
    snprintf(buf, sizeof buf, "%s", s);
    for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        int64_t v;
        char err[128];
        if (n == cap) infmoe_die_all("eval: --sweep %s: at most %d settings", s, cap);
        if (strcmp(t, "det") == 0) k[n++] = 0;
        else if (parse_int_arg("--sweep", t, 1, 1024, &v, err, sizeof err) == 0) k[n++] = (int)v;
        else infmoe_die_all("eval: --sweep %s: expected sample counts 1-1024 or det, comma-separated (e.g. 1,2,4,8,det)", s);
    }
    if (n == 0) infmoe_die_all("eval: --sweep %s: no settings", s);
    return n;
}

int infer_eval_main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "--help") == 0) {
        printf("usage: infmoe eval CKPT [--data SHARDS] [--batches N] [--batch B] [--ep EP]\n"
               "                  [--samples K | --deterministic] [--mc FILE]\n"
               "                  [--sweep 1,2,4,8,det [--csv FILE]] [--capacity-factor CF]\n"
               "\n"
               "Validation loss of checkpoint CKPT (a step_NNNNNN directory or a run's 'latest')\n"
               "over N global batches of B sequences (defaults: the checkpoint's data.val,\n"
               "train.eval_batches and train.batch_size), on the ranks of the MPI job.\n"
               "∞-MoE models: --samples K draws K samples per token (default: the checkpoint's\n"
               "ffn.samples, the low end of its training range with ffn.samples_max);\n"
               "--deterministic uses the single sample z = mu.\n"
               "--mc FILE: multiple-choice accuracy over the items of FILE (llm.c's eval format,\n"
               "e.g. its HellaSwag file for GPT-2-vocabulary models, or one 'infmoe prep\n"
               "--mc-from' writes): acc by summed and acc_norm by mean completion loss. Items go\n"
               "B/ranks/4 to a forward on each rank, so B must be at least 4 x ranks.\n"
               "--sweep (∞-MoE): one table of samples K -> val loss, mc accuracy, tokens/s, FFN\n"
               "GFLOPs per token as run and FFN seconds (split into routing, all-to-all and unit\n"
               "GEMMs), each setting timed after one untimed batch; also written as\n"
               "CSV (default sweep.csv). 'det' is the deterministic sample. tools/plot_sweep.py\n"
               "plots it.\n"
               "--capacity-factor CF (discrete MoE): each expert takes at most ceil(CF n k / E)\n"
               "of a rank's n tokens, the rest ride the residual; 0 or less: dropless (default:\n"
               "the checkpoint's ffn.eval_capacity_factor).\n");
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
    const char *known[] = {"--data", "--batches", "--batch", "--ep", "--samples", "--mc", "--sweep", "--csv",
                           "--capacity-factor", NULL};
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
    const char *sweep = option(argc, argv, "--sweep"), *mc_path = option(argc, argv, "--mc");
    if ((deterministic || option(argc, argv, "--samples") || sweep) && !ffn_kind_has_samples(cfg.ffn_kind))
        infmoe_die_all("eval: --samples, --deterministic and --sweep apply to ∞-MoE models (ffn.kind: infinite)");
    if (sweep && (deterministic || option(argc, argv, "--samples")))
        infmoe_die_all("eval: --sweep sets the samples itself: leave out --samples and --deterministic");
    if (option(argc, argv, "--csv") && !sweep) infmoe_die_all("eval: --csv goes with --sweep");
    char cap_set[96] = "";
    if (option(argc, argv, "--capacity-factor")) {
        if (cfg.ffn_kind != FFN_TOPK && cfg.ffn_kind != FFN_MOGE)
            infmoe_die_all("eval: --capacity-factor applies to discrete MoE models (ffn.kind topk, moge), not %s",
                           ffn_kind_name(cfg.ffn_kind));
        const char *v = option(argc, argv, "--capacity-factor");
        char *end = NULL;
        double cf = strtod(v, &end);
        if (end == v || *end != '\0' || !isfinite(cf))
            infmoe_die_all("eval: --capacity-factor %s: expected a number (0 or less: dropless)", v);
        snprintf(cap_set, sizeof cap_set, "ffn.eval_capacity_factor=%.9g", cf);
    }
    int ks[64], n_k = sweep ? parse_sweep(sweep, ks, 64) : 1;
    if (!sweep) ks[0] = deterministic ? 0 : samples;
    const char *data = option(argc, argv, "--data");
    if (!data) data = cfg.data_val[0] ? cfg.data_val : NULL;
    if (!data && !mc_path) infmoe_die_all("eval: the checkpoint's config has no data.val: give --data SHARDS (or --mc FILE)");
    if (batch % d.size) infmoe_die_all("eval: --batch %d must be divisible by the rank count %d", batch, d.size);
    if (mc_path && batch / d.size < MC_COMPLETIONS)
        infmoe_die_all("eval: --mc needs at least 4 sequences a rank (4 completions an item): --batch %d on %d ranks "
                       "gives %d; give --batch %d or more", batch, d.size, batch / d.size, MC_COMPLETIONS * d.size);
    char data_path[1024] = "";
    if (data) snprintf(data_path, sizeof data_path, "%s", data);
    config_free(&cfg);
    int B = batch / d.size;
    load_model(arg, B, (int)option_int(argc, argv, "eval", "--ep", 1, 1, 1 << 20), cap_set[0] ? cap_set : NULL, &d, &cfg, &m, path,
               sizeof path, &pos);
    mc_set mc = {0};
    if (mc_path) {
        char err[1024] = "";
        int bad = mc_read(mc_path, cfg.vocab_size, &mc, err, sizeof err);
        dist_exit_if_error(&d, bad ? err : "");
    }
    token_dataset ds;
    if (data) data_open(&ds, data_path, cfg.seq_len, cfg.vocab_size, (uint64_t)cfg.seed, cfg.tokenizer);
    eval_result res[64];
    mc_set first = mc; /* a sweep's untimed batch without validation data: one forward's items */
    if (first.n > B / MC_COMPLETIONS * d.size) first.n = B / MC_COMPLETIONS * d.size;
    for (int i = 0; i < n_k; i++) {
        if (ffn_kind_has_samples(cfg.ffn_kind)) model_set_samples(&m, ks[i] ? ks[i] : 1, ks[i] == 0);
        if (sweep) { /* timed warm: one untimed batch first, so no setting pays for the first touch */
            eval_result warm;
            eval_setting(&m, &d, data ? &ds : NULL, 1, batch, (int)pos.step, data ? NULL : &first, &warm);
        }
        eval_setting(&m, &d, data ? &ds : NULL, batches, batch, (int)pos.step, mc_path ? &mc : NULL, &res[i]);
        if (sweep) continue;
        char mode[48] = "";
        if (ffn_kind_has_samples(cfg.ffn_kind)) {
            if (deterministic) snprintf(mode, sizeof mode, " | samples deterministic");
            else snprintf(mode, sizeof mode, " | samples %d", samples);
        }
        if (cap_set[0]) snprintf(mode, sizeof mode, " | capacity factor %g", (double)cfg.eval_capacity_factor);
        if (data)
            dist_log("eval %s | step %lld | val_loss %.6f%s | %d batches x %d sequences | ranks %d | %.2f s\n", path,
                     (long long)pos.step, res[i].loss, mode, batches, batch, d.size, res[i].secs);
        if (mc_path)
            dist_log("mc %s | step %lld | items %d | acc %.4f | acc_norm %.4f%s | ranks %d | %.2f s\n", mc_path,
                     (long long)pos.step, mc.n, (double)res[i].mc_right / mc.n, (double)res[i].mc_right_norm / mc.n,
                     mode, d.size, res[i].mc_secs);
    }
    if (sweep) {
        const char *csv = option(argc, argv, "--csv") ? option(argc, argv, "--csv") : "sweep.csv";
        char what[2200] = "";
        if (data) snprintf(what, sizeof what, " | val %s, %d batches x %d", data_path, batches, batch);
        if (mc_path) snprintf(what + strlen(what), sizeof what - strlen(what), " | mc %s, %d items", mc_path, mc.n);
        dist_log("sweep %s | step %lld%s | ranks %d\n", path, (long long)pos.step, what, d.size);
        dist_log("  %-8s %10s %8s %9s %10s %14s %8s %8s %8s %8s\n", "samples", "val_loss", "acc", "acc_norm", "tok/s",
                 "ffn GFLOP/tok", "ffn s", "route s", "a2a s", "units s");
        FILE *f = d.rank == 0 ? fopen(csv, "w") : NULL;
        if (d.rank == 0 && !f) fprintf(stderr, "eval: cannot write %s: %s\n", csv, strerror(errno));
        if (f)
            fprintf(f, "samples,val_loss,acc,acc_norm,tokens_per_s,ffn_gflop_per_token,ffn_s,ffn_route_s,ffn_alltoall_s,"
                       "ffn_units_s\n");
        for (int i = 0; i < n_k; i++) {
            eval_result *r = &res[i];
            char k[16];
            if (ks[i]) snprintf(k, sizeof k, "%d", ks[i]);
            else snprintf(k, sizeof k, "det");
            double secs = data ? r->secs : r->mc_secs;
            double toks = data ? r->tokens : (double)mc.n * MC_COMPLETIONS * cfg.seq_len;
            double acc = mc_path ? (double)r->mc_right / mc.n : NAN, accn = mc_path ? (double)r->mc_right_norm / mc.n : NAN;
            const double route = r->ffn_phase[0] + r->ffn_phase[1];
            dist_log("  %-8s %10.6f %8.4f %9.4f %10.0f %14.4f %8.2f %8.2f %8.2f %8.2f\n", k, data ? r->loss : NAN, acc,
                     accn, toks / secs, r->ffn_flops / 1e9, r->ffn_secs, route, r->ffn_phase[2], r->ffn_phase[3]);
            if (f)
                fprintf(f, "%s,%.6f,%.4f,%.4f,%.0f,%.6f,%.3f,%.3f,%.3f,%.3f\n", k, data ? r->loss : NAN, acc, accn,
                        toks / secs, r->ffn_flops / 1e9, r->ffn_secs, route, r->ffn_phase[2], r->ffn_phase[3]);
        }
        if (f && fclose(f) == 0) dist_log("wrote %s\n", csv);
    }
    mc_free(&mc);
    if (data) data_close(&ds);
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
    load_model(arg, 1, (int)option_int(argc, argv, "sample", "--ep", 1, 1, 1 << 20), NULL, &d, &cfg, &m,
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
