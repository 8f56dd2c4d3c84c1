/*
 * bench_step: time training steps of a GPT-2-shaped model on random tokens
 * under MPI (mpirun -np P). Prints ms/step, tokens/s, model FLOP utilisation
 * against the fp32 FMA peak measured in the same run on the same cores, and
 * where the time goes (forward, backward, gradient allreduce, optimizer).
 *
 *   mpirun -np P bench_step [--layers 12 --embd 768 --heads 12 --seq 256
 *                            --batch 4 --vocab 50257 --hidden 0 --steps 3]
 *                           [--experts E --k K --expert-hidden H --ep EP]
 *                           [--units H --keep F --samples K --block B --chunk-units U --ep EP]
 * With --experts, every FFN is a noisy top-k MoE and the routing, dispatch,
 * all-to-all and expert GEMM shares of the step are printed too; with --units,
 * every FFN is an ∞-MoE (window mask) and its phase shares are printed.
 */
#include <math.h>
#include <stddef.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "infmoe/dispatch.h"
#include "infmoe/dist.h"
#include "infmoe/gemm.h"
#include "infmoe/infinite.h"
#include "infmoe/model.h"
#include "infmoe/optim.h"
#include "infmoe/peak.h"
#include "infmoe/util.h"

/* CPU seconds of every thread of this process, user and system. */
static double cpu_time(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + 1e-6 * (double)ru.ru_utime.tv_usec +
           (double)ru.ru_stime.tv_sec + 1e-6 * (double)ru.ru_stime.tv_usec;
}

/* Cumulative seconds in phase i (route, dispatch, all-to-all, expert) over the sparse layers. */
static double phase_time(const gpt_model *m, int i) {
    double t = 0.0, p[4];
    for (int l = 0; l < m->L; l++) {
        ffn_phase_times(&m->ffn[l], p);
        t += p[i];
    }
    return t;
}

/* Cumulative seconds of the ∞-MoE layers in router MLP, masks, unit GEMMs, all-to-all. */
static void inf_detail(const gpt_model *m, double t[4]) {
    double p[4];
    memset(t, 0, 4 * sizeof(double));
    for (int l = 0; l < m->L; l++)
        if (m->ffn[l].kind == FFN_INFINITE) {
            inf_phase_detail(m->ffn[l].inf, p);
            for (int i = 0; i < 4; i++) t[i] += p[i];
        }
}

static int arg_int(int argc, char **argv, const char *name, int def) {
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], name) == 0) return atoi(argv[i + 1]);
    return def;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0) {
            printf("usage: mpirun -np P bench_step [--layers L] [--embd C] [--heads NH] [--seq T]\n"
                   "       [--batch B_global] [--vocab V] [--hidden H] [--steps S]\n"
                   "       [--experts E --k K --expert-hidden HE --ep EP [--force-balance]\n"
                   "        [--expert-bias RATE] [--groups G --group-k GK] [--chunks D]] [--shared-hidden HS]\n"
                   "       [--units H --keep F --samples K --block B --chunk-units U --ep EP]\n"
                   "       [--precision fp32|bf16]\n"
                   "       [--grad-reduce overlap|blocking] [--bucket-mb MB] [--attention fused|stored]\n"
                   "       [--row-split on|off] [--a2a-probe]\n"
                   "Times training steps of a GPT-2-shaped model (dense, or noisy top-k MoE with\n"
                   "--experts, or ∞-MoE with --units); defaults: GPT-2 small, T=256, B=4, fp32,\n"
                   "3 timed steps after one warm-up. MFU is against the peak of the precision;\n"
                   "'allreduce' is the wait for the gradient reduction after backward (all of it when\n"
                   "blocking), slowest rank; on the last rank out of backward it is the reduction's\n"
                   "own exposed cost, the rest is waiting for that rank.\n"
                   "peak RSS is the largest rank's. --a2a-probe (MoE, ∞-MoE; one chunk): a barrier\n"
                   "before every all-to-all splits its time into waiting for the last rank to\n"
                   "arrive and moving the rows, each the largest over ranks.\n");
            return 0;
        }
    dist_ctx d;
    dist_init(&d, &argc, &argv);
    run_config cfg;
    config_defaults(&cfg);
    cfg.n_layer = arg_int(argc, argv, "--layers", 12);
    cfg.n_embd = arg_int(argc, argv, "--embd", 768);
    cfg.n_head = arg_int(argc, argv, "--heads", 12);
    cfg.seq_len = arg_int(argc, argv, "--seq", 256);
    cfg.batch_size = arg_int(argc, argv, "--batch", 4);
    cfg.vocab_size = arg_int(argc, argv, "--vocab", 50257);
    cfg.ffn_hidden = arg_int(argc, argv, "--hidden", 0);
    if (cfg.ffn_hidden == 0) cfg.ffn_hidden = 4 * cfg.n_embd;
    int steps = arg_int(argc, argv, "--steps", 3);
    cfg.inf_units = arg_int(argc, argv, "--units", 0);
    if (cfg.inf_units > 0) {
        cfg.ffn_kind = FFN_INFINITE;
        for (int i = 1; i + 1 < argc; i++)
            if (strcmp(argv[i], "--keep") == 0) cfg.keep = (float)atof(argv[i + 1]);
        cfg.samples = arg_int(argc, argv, "--samples", 2);
        cfg.mask_block = arg_int(argc, argv, "--block", 64);
        cfg.chunk_units = arg_int(argc, argv, "--chunk-units", 256);
        cfg.latent_dim = 1;
        cfg.ep = arg_int(argc, argv, "--ep", 1);
        if (cfg.inf_units % (cfg.ep * cfg.mask_block) || d.size % cfg.ep)
            infmoe_die_all("--ep x --block must divide --units, and --ep the rank count");
        dist_set_layout(&d, cfg.ep);
    }
    cfg.experts = arg_int(argc, argv, "--experts", 0);
    if (cfg.experts > 0) {
        cfg.ffn_kind = FFN_TOPK;
        cfg.top_k = arg_int(argc, argv, "--k", 2);
        cfg.expert_hidden = arg_int(argc, argv, "--expert-hidden", cfg.ffn_hidden / cfg.top_k);
        cfg.ep = arg_int(argc, argv, "--ep", 1);
        if (cfg.experts % cfg.ep || d.size % cfg.ep)
            infmoe_die_all("--ep must divide --experts and the rank count");
        cfg.alltoall_chunks = arg_int(argc, argv, "--chunks", 1);
        if (cfg.alltoall_chunks < 1 || cfg.alltoall_chunks > cfg.experts / cfg.ep)
            infmoe_die_all("--chunks must be 1 to the experts of a rank (--experts / --ep)");
        dist_set_layout(&d, cfg.ep);
        for (int i = 1; i < argc; i++)
            if (strcmp(argv[i], "--force-balance") == 0) cfg.force_balance = 1;
        for (int i = 1; i + 1 < argc; i++)
            if (strcmp(argv[i], "--expert-bias") == 0) cfg.expert_bias_rate = (float)atof(argv[i + 1]);
        /* hierarchical: --k experts in each of --group-k of --groups groups */
        cfg.groups = arg_int(argc, argv, "--groups", 0);
        cfg.group_k = arg_int(argc, argv, "--group-k", 1);
        if (cfg.groups > 0 && (cfg.groups < 2 || cfg.experts % cfg.groups || cfg.groups % cfg.ep ||
                               cfg.group_k > cfg.groups || cfg.top_k > cfg.experts / cfg.groups))
            infmoe_die_all("--groups must divide --experts and be divisible by --ep, with --group-k "
                           "<= --groups and --k <= experts per group");
    }
    cfg.shared_hidden = arg_int(argc, argv, "--shared-hidden", 0);
    if (cfg.shared_hidden > 0 && cfg.ffn_kind == FFN_DENSE)
        infmoe_die_all("--shared-hidden goes with --experts or --units");
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], "--precision") == 0) {
            if (strcmp(argv[i + 1], "bf16") == 0) cfg.precision = PRECISION_BF16;
            else if (strcmp(argv[i + 1], "fp32") == 0) cfg.precision = PRECISION_FP32;
            else infmoe_die_all("--precision takes fp32 or bf16, not '%s'", argv[i + 1]);
        }
    cfg.grad_overlap = 1;
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], "--grad-reduce") == 0) {
            if (strcmp(argv[i + 1], "overlap") == 0) cfg.grad_overlap = 1;
            else if (strcmp(argv[i + 1], "blocking") == 0) cfg.grad_overlap = 0;
            else infmoe_die_all("--grad-reduce takes overlap or blocking, not '%s'", argv[i + 1]);
        }
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], "--attention") == 0) {
            if (strcmp(argv[i + 1], "fused") == 0) cfg.att_stored = 0;
            else if (strcmp(argv[i + 1], "stored") == 0) cfg.att_stored = 1;
            else infmoe_die_all("--attention takes fused or stored, not '%s'", argv[i + 1]);
        }
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], "--row-split") == 0) {
            if (strcmp(argv[i + 1], "on") == 0) gemm_set_row_split(1);
            else if (strcmp(argv[i + 1], "off") == 0) gemm_set_row_split(0);
            else infmoe_die_all("--row-split takes on or off, not '%s'", argv[i + 1]);
        }
    int probe = 0;
    for (int i = 1; i < argc; i++) probe |= strcmp(argv[i], "--a2a-probe") == 0;
    if (probe && cfg.alltoall_chunks > 1)
        infmoe_die_all("--a2a-probe times exchanges in one piece: leave out --chunks");
    dispatch_set_probe(probe);
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], "--bucket-mb") == 0) cfg.grad_bucket_mb = (float)atof(argv[i + 1]);
    char msg[512];
    if (model_precision(&cfg, msg, sizeof msg) < 0) infmoe_die_all("%s", msg);
    if (cfg.batch_size % d.size != 0) infmoe_die_all("--batch must be divisible by the rank count");
    int B = cfg.batch_size / d.size, T = cfg.seq_len;

    gpt_model m;
    model_build(&m, &cfg, B, &d);
    model_init_params(&m, 1);
    int32_t *tok = xcalloc((size_t)B * T + 1, sizeof(int32_t));
    rng_state r;
    rng_seed(&r, 1 + (uint64_t)d.rank);
    for (int i = 0; i <= B * T; i++) tok[i] = (int32_t)(rng_u64(&r) % (uint64_t)cfg.vocab_size);

    /* the peak before and after the steps, the larger kept: a neighbour's burst on
     * a shared machine lowers one measurement of 0.2 s, never raises it */
    double peak = m.bf16 ? peak_bf16_gflops(0.2) : peak_fma_gflops(0.2);
    dist_allreduce_sum_d(&peak, 1, d.world);

    double t_fwd = 0, t_bwd = 0, t_ar = 0, t_ar_min = 0, t_opt = 0, t_total = 0;
    double moe0[4] = {0}, rows = 0, cpu_steps = 0, wall_steps = 0, probe0[2] = {0, 0};
    for (int s = 0; s <= steps; s++) {
        if (s == 1) { /* start the MoE timers and the probe after the warm-up step */
            for (int i = 0; i < 4; i++)
                moe0[i] = phase_time(&m, i);
            dispatch_probe_times(&probe0[0], &probe0[1]);
        }
        MPI_CHECK(MPI_Barrier(d.world));
        double t0 = wall_time(), c0 = cpu_time();
        model_set_step(&m, s, (int64_t)d.rank * B * T, 1);
        model_forward(&m, tok, tok + 1);
        double t1 = wall_time();
        model_zero_grad(&m);
        double norm = 0.0, t2, t3;
        if (cfg.grad_overlap) { /* backward with the reduction behind it; then what is left */
            model_backward_overlapped(&m, &d);
            t2 = wall_time();
            norm = model_finish_reduction(&m, &d);
        } else {
            model_backward(&m);
            t2 = wall_time();
            norm = model_reduce_gradients(&m, &d);
        }
        t3 = wall_time();
        model_update(&m, &cfg, 1e-4f, s, optim_clip_scale(1.0f, norm));
        model_end_step(&m);
        double t4 = wall_time();
        if (s > 0) {
            cpu_steps += cpu_time() - c0;
            wall_steps += t4 - t0;
            /* expert rows this rank computed: its experts' share of all assignments */
            for (int l = 0; l < m.L; l++)
                if (m.ffn[l].kind == FFN_TOPK || m.ffn[l].kind == FFN_MOGE) {
                    stats_row st;
                    ffn_stats_row(&m.ffn[l], &st);
                    for (int e = 0; e < cfg.experts / cfg.ep; e++)
                        rows += (double)st.tokens[d.ep_rank * (cfg.experts / cfg.ep) + e] /
                                (d.size / cfg.ep);
                }
        }
        double times[5] = {t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0};
        /* the least waiting rank is the last to finish backward: its wait is what the
         * reduction itself costs; the others' is waiting for it */
        double wait_min = -(t3 - t2);
        dist_allreduce_max_d(&wait_min, 1, d.world);
        dist_allreduce_max_d(times, 5, d.world);
        if (s == 0) continue; /* warm-up: primitive creation, first touch of buffers */
        t_fwd += times[0];
        t_bwd += times[1];
        t_ar += times[2];
        t_ar_min += -wait_min;
        t_opt += times[3];
        t_total += times[4];
    }
    double peak_after = m.bf16 ? peak_bf16_gflops(0.2) : peak_fma_gflops(0.2);
    dist_allreduce_sum_d(&peak_after, 1, d.world);
    if (peak_after > peak) peak = peak_after;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double rss_mib = (double)ru.ru_maxrss / 1024.0;
    dist_allreduce_max_d(&rss_mib, 1, d.world);
    /* the share of this rank's threads x wall its threads were on a core, the least
     * busy rank: below 100% where one thread works alone (serial code) or threads
     * wait for each other; with OMP_WAIT_POLICY=passive idle threads sleep */
    double busy = -cpu_steps / (wall_steps * omp_get_max_threads());
    dist_allreduce_max_d(&busy, 1, d.world);
    busy = -busy;
    double moe_t[4];
    for (int i = 0; i < 4; i++)
        moe_t[i] = phase_time(&m, i) - moe0[i];
    dist_allreduce_max_d(moe_t, 4, d.world);
    double probe_t[2];
    dispatch_probe_times(&probe_t[0], &probe_t[1]);
    probe_t[0] -= probe0[0];
    probe_t[1] -= probe0[1];
    dist_allreduce_max_d(probe_t, 2, d.world);
    double inf_t[4];
    inf_detail(&m, inf_t);
    dist_allreduce_max_d(inf_t, 4, d.world);
    /* ∞-MoE shards' forward work per layer: the layer's exchange waits for its busiest
     * shard, so the step pays the sum over layers of the largest */
    double work_max = 0.0, work_mean = 0.0, computed = 0.0, kept = 0.0;
    int chunk_units = 0;
    for (int l = 0; l < m.L; l++)
        if (m.ffn[l].kind == FFN_INFINITE) {
            double w[2], wmax[2], wsum[2];
            inf_shard_work(m.ffn[l].inf, w);
            chunk_units = inf_chunk_units(m.ffn[l].inf);
            dist_allreduce_max_d(memcpy(wmax, w, sizeof w), 2, d.world);
            dist_allreduce_sum_d(memcpy(wsum, w, sizeof w), 2, d.world);
            work_max += wmax[0];
            work_mean += wsum[0] / d.size;
            computed += wsum[0];
            kept += wsum[1];
        }
    double expert_flops = rows * 12.0 * cfg.n_embd * cfg.expert_hidden; /* fwd 2 + bwd 4 GEMMs */
    double rank_peak = peak / d.size;
    double ms = t_total / steps * 1e3;
    double tok_s = (double)cfg.batch_size * T / (t_total / steps);
    double flops = model_flops_per_token(&m);
    int n_moe = 0, n_inf = 0;
    for (int l = 0; l < m.L; l++) {
        n_inf += m.ffn[l].kind == FFN_INFINITE;
        n_moe += m.ffn[l].kind == FFN_TOPK || m.ffn[l].kind == FFN_MOGE;
    }
    if (d.rank == 0) {
        printf("bench_step: L%d C%d NH%d T%d V%d H%d | global batch %d | ranks %d x threads %d\n",
               cfg.n_layer, cfg.n_embd, cfg.n_head, T, cfg.vocab_size, cfg.ffn_hidden,
               cfg.batch_size, d.size, omp_get_max_threads());
        if (cfg.shared_hidden > 0) printf("  shared FFN of %d units in every routed layer\n", cfg.shared_hidden);
        printf("  params %.1fM | %.2f GFLOP/token | precision %s | attention %s | peak %.0f GFLOP/s "
               "%s (%s, %d cores in use) | bf16 / fp32 vector rate %.2f (auto: %s)\n",
               (double)model_num_params(&m) / 1e6, flops / 1e9, m.bf16 ? "bf16" : "fp32",
               m.att_fused ? "fused" : "stored", peak, m.bf16 ? "bf16" : "fp32",
               m.bf16 ? peak_bf16_source() : "FMA loop", d.size * omp_get_max_threads(),
               peak_bf16_ratio(), model_bf16_pays() ? "bf16" : "fp32");
        printf("  ms/step %.1f | tok/s %.0f | mfu %.1f%% | peak RSS %.0f MiB per rank\n", ms, tok_s,
               tok_s * flops / (peak * 1e9) * 100, rss_mib);
        printf("  forward %.1f%% | backward %.1f%% | allreduce %.1f%% (%s, buckets %.3g MiB; "
               "%.1f%% on the last rank out of backward) | optimizer %.1f%%\n",
               100 * t_fwd / t_total, 100 * t_bwd / t_total, 100 * t_ar / t_total,
               cfg.grad_overlap ? "overlapped" : "blocking", cfg.grad_bucket_mb,
               100 * t_ar_min / t_total, 100 * t_opt / t_total);
        printf("  threads busy %.1f%% of %d x wall (least busy rank; waiting in MPI counts as busy)\n",
               100 * busy, omp_get_max_threads());
        if (probe && (n_moe > 0 || n_inf > 0))
            printf("  all-to-all probe (barrier first, largest over ranks) | waiting for the last rank "
                   "%.1f%% | moving rows %.1f%%\n",
                   100 * probe_t[0] / t_total, 100 * probe_t[1] / t_total);
        char hier[64] = "";
        if (cfg.groups > 0)
            snprintf(hier, sizeof hier, " in top-%d of %d groups", cfg.group_k, cfg.groups);
        if (n_moe > 0)
            printf("  moe E%d top-%d%s width %d ep %d chunks %d%s%s | routing %.1f%% | dispatch %.1f%% | "
                   "all-to-all %.1f%% | expert GEMMs %.1f%% at %.1f%% of peak (%.0f rows/expert/layer)\n",
                   cfg.experts, cfg.top_k, hier, cfg.expert_hidden, cfg.ep, cfg.alltoall_chunks,
                   cfg.force_balance ? " forced balance" : "", cfg.expert_bias_rate > 0 ? " expert bias" : "",
                   100 * moe_t[0] / t_total,
                   100 * moe_t[1] / t_total, 100 * moe_t[2] / t_total, 100 * moe_t[3] / t_total,
                   100 * expert_flops / moe_t[3] / (rank_peak * 1e9),
                   rows / steps / n_moe / (cfg.experts / cfg.ep));
        if (n_inf > 0) {
            /* the timers include the warm-up step; routing is the router MLP, sampling and masks */
            double all = (steps + 1.0) * t_total / steps;
            stats_row st;
            ffn_stats_row(&m.ffn[0], &st);
            printf("  ∞-MoE H%d keep %.1f%% K%d blocks %d ep %d | routing and masks %.1f%% | "
                   "unit GEMMs %.1f%% | all-to-all %.1f%% | active units/token %.0f\n",
                   cfg.inf_units, 100 * cfg.keep, cfg.samples, cfg.mask_block, cfg.ep,
                   100 * phase_time(&m, 0) / all, 100 * phase_time(&m, 3) / all,
                   100 * phase_time(&m, 2) / all, st.active_units);
            printf("  ∞-MoE detail (slowest rank) | router MLP %.1f%% | masks %.1f%% | units %.1f%% | "
                   "all-to-all %.1f%%\n",
                   100 * inf_t[0] / all, 100 * inf_t[1] / all, 100 * inf_t[2] / all,
                   100 * inf_t[3] / all);
            printf("  ∞-MoE shard work (unit rows, forward) | chunks of %d units | busiest shard / mean "
                   "%.3f (summed over layers) | computed / kept units %.3f\n",
                   chunk_units, work_mean > 0 ? work_max / work_mean : 0.0,
                   kept > 0 ? computed / kept : 0.0);
        }
    }
    free(tok);
    model_free(&m);
    gemm_shutdown();
    dist_finalize(&d);
    return 0;
}
