/*
 * stats: routing statistics of the MoE layers in <output.dir>/stats.h5, and the
 * `infmoe stats` report. Format and definitions: docs/stats.md.
 *
 * Every train.stats_every steps, after the step's update, every rank calls
 * stats_append: the per-layer phase timers are reduced (max over ranks) and
 * rank 0 appends one row per layer (the counters moe.c has already reduced over
 * all ranks) and flushes. The file is written in HDF5 SWMR mode, so readers
 * (H5F_ACC_SWMR_READ, `infmoe stats --follow`, tools/plot_usage.py) see rows
 * while the job runs, and a killed job leaves every flushed row readable.
 * A resumed run reopens the file and drops the rows after the checkpoint's step
 * before appending, so /step has no gap and no duplicate.
 *
 * Two levels: stats_writer_* writes one file from one process, with layers
 * described generically (a "bucket" is an expert, or a unit block of ∞-MoE;
 * histograms of sampled z and sigma exist only for layers that give them);
 * stats_open/append/close run it from the trainer on every rank.
 */
#ifndef INFMOE_STATS_H
#define INFMOE_STATS_H

#include <stddef.h>
#include <stdint.h>

#include "infmoe/config.h"
#include "infmoe/dist.h"
#include "infmoe/model.h"

#define STATS_FORMAT "infmoe-stats"
#define STATS_FORMAT_VERSION 1
#define STATS_MAX_AUX 8

/* What one layer's rows hold; fixed for the life of the file. */
typedef struct {
    int layer;              /* model layer: group /layers/h.<layer> */
    const char *kind;       /* ffn.kind of the layer ("topk", "moge", ...) */
    const char *bucket;     /* what /tokens counts per column: "expert", "block" */
    int n_buckets;
    int k;                  /* choices per token (0: not applicable) */
    int n_aux;              /* aux losses, stored as aux_<name> */
    const char *aux_names[STATS_MAX_AUX];
    int z_bins, sigma_bins; /* > 0: histogram datasets z_hist, sigma_hist */
    double z_lo, z_hi, sigma_lo, sigma_hi; /* their range: bins of equal width */
} stats_layer_desc;

/* One layer's counters for one row (global over the ranks). */
typedef struct {
    const int64_t *tokens;  /* (n_buckets) kept assignments per bucket */
    int64_t n_tokens, assignments, dropped;
    double gate_entropy, router_entropy, top_gate;
    double aux[STATS_MAX_AUX];
    double t_route, t_dispatch, t_alltoall, t_expert; /* seconds per step */
    double mean_sigma, mask_overlap, active_units;   /* ∞-MoE (0 for discrete MoE) */
    const int64_t *z_hist, *sigma_hist;               /* (z_bins), (sigma_bins) or NULL */
} stats_row;

typedef struct stats_writer stats_writer;

/*
 * Open path for appending. resume_step < 0: a new file (any old one is replaced).
 * resume_step >= 0: reopen it (also after a crash) and drop the rows with step >
 * resume_step; a missing file is created. NULL with a message in err when the
 * file cannot be opened, or when an existing one does not match the layers.
 * config_text (may be NULL) is stored as the root attribute `config`.
 */
stats_writer *stats_writer_open(const char *path, const stats_layer_desc *layers, int n_layers,
                                int64_t resume_step, const char *config_text, char *err,
                                size_t errcap);
/* Append one row per layer (rows in the order of the descs) and flush: 0 or -1. */
int stats_writer_append(stats_writer *w, int64_t step, const stats_row *rows);
/* Rows in the file. */
int64_t stats_writer_rows(const stats_writer *w);
void stats_writer_close(stats_writer *w);

/*
 * The trainer's side (collective: every rank calls each). stats_open returns
 * NULL when cfg->stats_every is 0 or the model has no MoE (or ∞-MoE) layer. resume_step as
 * for stats_writer_open. A file that cannot be written turns the statistics off
 * with one log line; training goes on.
 */
typedef struct stats_run stats_run;
stats_run *stats_open(const char *dir, const gpt_model *m, const run_config *cfg,
                      const dist_ctx *d, int64_t resume_step);
/* One row per MoE layer for `step` (optimizer steps completed). */
void stats_append(stats_run *s, const gpt_model *m, int64_t step);
void stats_close(stats_run *s);

/* infmoe stats FILE [--layers LIST] [--steps FROM:TO] [--csv] [--follow] */
int stats_main(int argc, char **argv);

#endif
