/* train: the training loop, evaluation and logging (see train.h). */
#define _POSIX_C_SOURCE 200809L
#include "infmoe/train.h"

#include <math.h>
#include <omp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/ckpt.h"
#include "infmoe/config.h"
#include "infmoe/data.h"
#include "infmoe/dist.h"
#include "infmoe/ffn.h"
#include "infmoe/model.h"
#include "infmoe/optim.h"
#include "infmoe/peak.h"
#include "infmoe/rundir.h"
#include "infmoe/stats.h"
#include "infmoe/util.h"

static void train_usage(FILE *f) {
    fprintf(f,
            "usage: infmoe train CONFIG [--set section.key=value]... [--resume auto|PATH]\n"
            "\n"
            "Train the model CONFIG (YAML; keys in docs/config.md) on the ranks of the MPI\n"
            "job (mpirun -np P infmoe train CONFIG). train.batch_size is the global batch\n"
            "in sequences, split evenly over the ranks.\n"
            "\n"
            "options:\n"
            "  --set section.key=value   override one config key (repeatable)\n"
            "  --resume auto             continue from the checkpoint output.dir/latest names\n"
            "                            (start fresh when there is none)\n"
            "  --resume PATH             continue from checkpoint PATH (any rank count and ep)\n"
            "  --help                    this text\n"
            "\n"
            "Rank 0 logs progress to stdout and appends it to <output.dir>/train.log.\n"
            "Checkpoints go to <output.dir>/step_NNNNNN every train.ckpt_every steps and at\n"
            "the end. SIGTERM or SIGUSR1: every rank finishes its step, the job saves a\n"
            "checkpoint and exits with status 75, for a launcher to requeue.\n");
}

static volatile sig_atomic_t g_signal = 0;
static void on_signal(int sig) { g_signal = sig; }

static void catch_stop_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
}

/* Mean validation loss over eval_batches global batches, averaged over all ranks. */
static float evaluate(gpt_model *m, token_dataset *val, const run_config *cfg,
                      const dist_ctx *d, int32_t *inputs, int32_t *targets) {
    double sum = 0.0;
    for (int b = 0; b < cfg->eval_batches; b++) {
        uint64_t first = (uint64_t)b * cfg->batch_size + (uint64_t)d->rank * m->B;
        data_eval_batch(val, first, m->B, inputs, targets);
        /* routing draws keyed by the global token, so any rank count samples alike */
        model_set_step(m, 0, (int64_t)first * cfg->seq_len, 0);
        sum += model_forward(m, inputs, targets);
    }
    dist_allreduce_sum_d(&sum, 1, d->world);
    return (float)(sum / ((double)cfg->eval_batches * d->size));
}

int train_main(int argc, char **argv) {
    const char *config_path = NULL, *resume = NULL;
    char **sets = xcalloc((size_t)argc, sizeof(char *));
    int n_sets = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            train_usage(stdout);
            free(sets);
            return 0;
        } else if (strcmp(argv[i], "--set") == 0) {
            if (i + 1 >= argc) {
                fprintf(stderr, "infmoe train: --set needs section.key=value\n");
                return 1;
            }
            sets[n_sets++] = argv[++i];
        } else if (strncmp(argv[i], "--set=", 6) == 0) {
            sets[n_sets++] = argv[i] + 6;
        } else if (strcmp(argv[i], "--resume") == 0) {
            if (i + 1 >= argc) {
                fprintf(stderr, "infmoe train: --resume needs 'auto' or a checkpoint path\n");
                return 1;
            }
            resume = argv[++i];
        } else if (argv[i][0] == '-') {
            fprintf(stderr, "infmoe train: unknown option '%s' (see infmoe train --help)\n", argv[i]);
            return 1;
        } else if (!config_path) {
            config_path = argv[i];
        } else {
            fprintf(stderr, "infmoe train: more than one config given ('%s' and '%s')\n",
                    config_path, argv[i]);
            return 1;
        }
    }
    if (!config_path) {
        fprintf(stderr, "infmoe train: no config given\n");
        train_usage(stderr);
        return 1;
    }

    catch_stop_signals();
    dist_ctx d;
    dist_init(&d, &argc, &argv);
    run_config cfg;
    config_load(&cfg, config_path, n_sets, sets, d.rank != 0);
    config_check_layout(&cfg, d.size, d.rank != 0);
    char msg[512];
    if (model_precision(&cfg, msg, sizeof msg) < 0) infmoe_die_all("%s", msg);
    dist_set_layout(&d, cfg.ep);
    const int B = cfg.batch_size / d.size, T = cfg.seq_len;
    const int threads = omp_get_max_threads();

    run_dir dir;
    rundir_open(&dir, cfg.output_dir, &d); /* locked for this run before anything is written */

    token_dataset train, val;
    data_open(&train, cfg.data_train, T, cfg.vocab_size, (uint64_t)cfg.seed, cfg.tokenizer);
    int have_val = cfg.data_val[0] != '\0';
    if (have_val) data_open(&val, cfg.data_val, T, cfg.vocab_size, (uint64_t)cfg.seed, cfg.tokenizer);

    gpt_model m;
    model_build(&m, &cfg, B, &d);
    model_init_params(&m, (uint64_t)cfg.seed);
    ckpt_position start = {0, 0};
    char ckpt_path[2048] = "";
    if (resume) {
        if (ckpt_resolve(resume, cfg.output_dir, ckpt_path, sizeof ckpt_path))
            start = ckpt_load(ckpt_path, &m, &cfg, &d);
        else
            dist_log("no checkpoint in %s: starting from step 0\n", cfg.output_dir);
    }
    if (start.step > cfg.steps)
        infmoe_die_all("%s is at step %lld, beyond train.steps (%d): raise train.steps to train on",
                       ckpt_path, (long long)start.step, cfg.steps);
    /* Only now, with the data and any checkpoint loaded, write into the run directory. */
    char err[2048] = "";
    if (d.rank == 0) { /* the effective config (file, overrides and defaults), and the log */
        char *text = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&text, &len);
        if (!f) infmoe_die("out of memory printing the config");
        config_print(&cfg, f);
        fclose(f);
        FILE *log = rundir_replace(&dir, "config.yaml", text, err, sizeof err) == 0
                        ? rundir_append(&dir, "train.log", err, sizeof err)
                        : NULL;
        dist_log_open(log);
        free(text);
    }
    dist_exit_if_error(&d, err);
    int32_t *inputs = xcalloc((size_t)B * T, sizeof(int32_t));
    int32_t *targets = xcalloc((size_t)B * T, sizeof(int32_t));

    /* Peak of the cores this job uses, in the precision it computes in: every rank
     * measures its own threads at once. */
    double peak = m.bf16 ? peak_bf16_gflops(0.05) : peak_fma_gflops(0.05);
    dist_allreduce_sum_d(&peak, 1, d.world);
    const double flops_per_token = model_flops_per_token(&m);
    const double tokens_per_step = (double)cfg.batch_size * T;

    char auto_note[128] = "";
    if (cfg.precision == PRECISION_AUTO) {
        char why[112];
        model_precision_auto_note(why, sizeof why);
        snprintf(auto_note, sizeof auto_note, " (%s)", why);
    }
    if (m.bf16 && cfg.precision == PRECISION_BF16 && !model_bf16_pays())
        dist_log("warning: train.precision bf16 on a CPU whose bf16 products run at %.2fx the fp32 "
                 "rate: fp32 (or auto) trains faster here\n",
                 peak_bf16_ratio());
    if (cfg.warmup_clamped_from)
        dist_log("train.warmup %d is above train.steps %d: warming up over all %d steps\n",
                 cfg.warmup_clamped_from, cfg.steps, cfg.warmup);
    char chunks_note[48] = "";
    if (cfg.alltoall_chunks > 1)
        snprintf(chunks_note, sizeof chunks_note, " (all-to-all in %d chunks)", cfg.alltoall_chunks);
    dist_log("infmoe train %s | ranks %d x threads %d | ep %d%s | params %.2fM | "
             "batch %d x %d tokens | data %llu sequences | precision %s%s | peak %.0f GFLOP/s %s%s\n",
             config_path, d.size, threads, cfg.ep, chunks_note, (double)model_num_params(&m) / 1e6,
             cfg.batch_size, T, (unsigned long long)train.n_windows, m.bf16 ? "bf16" : "fp32",
             auto_note,
             peak, m.bf16 ? "bf16" : "fp32",
             m.bf16 ? (m.att_fused ? " | attention fused" : " | attention stored") : "");

    if (ckpt_path[0])
        dist_log("resumed from %s: step %lld, %lld sequences seen\n", ckpt_path,
                 (long long)start.step, (long long)start.data_position);
    /* routing statistics: <output.dir>/stats.h5 every stats_every steps (docs/stats.md);
     * a resumed run keeps the rows up to the checkpoint's step and appends */
    stats_run *stats = stats_open(cfg.output_dir, &m, &cfg, &d, resume ? start.step : -1);
    double t_train = 0.0, mfu_sum = 0.0;
    int timed_steps = 0, stop = 0;
    float loss = NAN, val_loss = NAN;
    for (int step = (int)start.step; step < cfg.steps && !stop; step++) {
        double t0 = wall_time();
        /* sequences consumed before this step: the data position survives a change of
         * rank count and of batch size across a resume */
        int64_t seen = start.data_position + (int64_t)(step - start.step) * cfg.batch_size;
        uint64_t first = (uint64_t)seen + (uint64_t)d.rank * B;
        data_train_batch(&train, first, B, inputs, targets);
        model_set_step(&m, step, (int64_t)first * T, 1);
        double local_loss = model_forward(&m, inputs, targets);
        model_zero_grad(&m);
        double norm;
        if (cfg.grad_overlap) {
            model_backward_overlapped(&m, &d);
            norm = model_finish_reduction(&m, &d);
        } else {
            model_backward(&m);
            norm = model_reduce_gradients(&m, &d);
        }
        dist_allreduce_sum_d(&local_loss, 1, d.world);
        loss = (float)(local_loss / d.size);
        /* A nan or inf stops the run before the update: with fp32 master weights and no loss
         * scaler it means divergence, not a transient overflow worth skipping. The loss and
         * the norm are sums over every rank already (a nan or inf anywhere makes them nan or
         * inf everywhere), so all ranks take this branch together. */
        if (!isfinite(loss) || !isfinite(norm))
            infmoe_die_all("step %d: loss %g, grad_norm %g: not finite, so the step is not applied "
                           "and nothing is saved (checkpoints already in %s are untouched); lower "
                           "train.lr or check the data", step + 1, loss, norm, cfg.output_dir);
        float lr = optim_lr(&cfg, step);
        model_update(&m, &cfg, lr, step, optim_clip_scale(cfg.grad_clip, norm));
        model_end_step(&m);
        if (stats && (step + 1) % cfg.stats_every == 0) stats_append(stats, &m, step + 1);
        double dt = wall_time() - t0;
        double tok_s = tokens_per_step / dt;
        double mfu = tok_s * flops_per_token / (peak * 1e9) * 100.0;
        if (step > start.step) { /* the first step pays for primitive creation and page faults */
            t_train += dt;
            mfu_sum += mfu;
            timed_steps++;
        }
        if ((step + 1) % cfg.log_every == 0 || step == 0 || step + 1 == cfg.steps) {
            char moe[160];
            ffn_log_fields(m.ffn, m.L, m.aux_loss, moe, sizeof moe);
            dist_log("step %d/%d | loss %.6f | lr %.2e | grad_norm %.4f | ms %.1f | tok/s %.0f | "
                     "mfu %.1f%%%s\n",
                     step + 1, cfg.steps, loss, lr, norm, dt * 1e3, tok_s, mfu, moe);
        }
        if (have_val && cfg.eval_every > 0 &&
            ((step + 1) % cfg.eval_every == 0 || step + 1 == cfg.steps)) {
            val_loss = evaluate(&m, &val, &cfg, &d, inputs, targets);
            dist_log("eval %d/%d | val_loss %.6f\n", step + 1, cfg.steps, val_loss);
        }
        /* a stop signal on any rank stops every rank after this step */
        int sig = g_signal;
        MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &sig, 1, MPI_INT, MPI_MAX, d.world));
        stop = sig != 0;
        if (stop || step + 1 == cfg.steps || (cfg.ckpt_every > 0 && (step + 1) % cfg.ckpt_every == 0)) {
            ckpt_position pos = {step + 1, seen + cfg.batch_size};
            double ts = wall_time();
            ckpt_save(&dir, &m, &cfg, &d, pos, cfg.keep_last);
            dist_log("checkpoint %s/step_%06d | %.2f s\n", cfg.output_dir, step + 1, wall_time() - ts);
        }
        if (stop) {
            dist_log("signal %d: saved at step %d; exiting with status %d (resume with --resume auto)\n",
                     sig, step + 1, EXIT_SAVED_ON_SIGNAL);
        }
    }
    double tok_s = timed_steps ? tokens_per_step * timed_steps / t_train : 0.0;
    if (!stop) {
        char val[48] = ""; /* no validation configured (train.eval_every 0): no val_loss field */
        if (!isnan(val_loss)) snprintf(val, sizeof val, " | val_loss %.6f", val_loss);
        dist_log("done %d steps | train_loss %.6f%s | tok/s %.0f | mfu %.1f%% | ranks %d x threads %d\n",
                 cfg.steps, loss, val, tok_s, timed_steps ? mfu_sum / timed_steps : 0.0, d.size,
                 threads);
    }

    stats_close(stats);
    free(inputs);
    free(targets);
    model_free(&m);
    data_close(&train);
    if (have_val) data_close(&val);
    config_free(&cfg);
    free(sets);
    rundir_close(&dir);
    dist_finalize(&d);
    return stop ? EXIT_SAVED_ON_SIGNAL : 0;
}
