/*
 * statsfile: the routing-statistics file <output.dir>/stats.h5, its one schema,
 * its writer and its reader. Format and definitions: docs/stats.md.
 *
 * Layers are described generically: a "bucket" is an expert, or a unit block
 * of ∞-MoE; histograms of sampled z and sigma exist only for layers that give
 * them. Each layer has one compound dataset /layers/h.<l>/rows, a record per
 * row of /step: tokens[n_buckets], the scalar columns below, aux_<name> per aux
 * loss, then z_hist, sigma_hist, bias and shared_share where present. The writer (one process)
 * works in HDF5 SWMR mode, so readers see rows while the job runs and a killed
 * job leaves every flushed row readable; it drops rows after a resume step.
 * This module knows nothing of models: stats.h feeds it from the trainer,
 * statsreport.h prints it.
 */
#ifndef INFMOE_STATSFILE_H
#define INFMOE_STATSFILE_H

#include <stddef.h>
#include <stdint.h>

#define STATS_FORMAT "infmoe-stats"
#define STATS_FORMAT_VERSION 1
#define STATS_MAX_AUX 8

/* The columns of a row, in the order they are stored (tokens is the bucket array). */
typedef enum {
    STATS_COL_TOKENS, STATS_COL_N_TOKENS, STATS_COL_DROPPED, STATS_COL_DROPPED_FRAC,
    STATS_COL_GATE_ENT, STATS_COL_ROUTER_ENT, STATS_COL_CONFIDENCE, STATS_COL_CV,
    STATS_COL_MAX_MEAN, STATS_COL_UNUSED, STATS_COL_TOP20, STATS_COL_BOTTOM20,
    STATS_COL_T_ROUTE, STATS_COL_T_DISPATCH, STATS_COL_T_ALLTOALL, STATS_COL_T_EXPERT,
    STATS_COL_SIGMA, STATS_COL_OVERLAP, STATS_COL_ACTIVE,
    STATS_N_COLUMNS /* then aux_<name>..., z_hist, sigma_hist */
} stats_column;

typedef struct {
    const char *name;
    int is_int;
    const char *description;
} stats_column_info;
extern const stats_column_info stats_columns[STATS_N_COLUMNS];

/* What one layer's rows hold; fixed for the life of the file. */
typedef struct {
    int layer;              /* model layer: group /layers/h.<layer> */
    const char *kind;       /* ffn.kind of the layer ("topk", "moge", ...) */
    const char *bucket;     /* what the tokens field counts per column: "expert", "block" */
    int n_buckets;
    int k;                  /* choices per token (0: not applicable) */
    int n_aux;              /* aux losses, stored as aux_<name> */
    const char *aux_names[STATS_MAX_AUX];
    int z_bins, sigma_bins; /* > 0: histogram fields z_hist, sigma_hist in each record */
    int has_bias;           /* field bias[n_buckets]: the experts' routing bias */
    int has_shared;         /* field shared_share: the shared FFN's share of the output */
    int groups;             /* hierarchical MoE: buckets in this many equal groups (0: none) */
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
    const double *bias;                               /* (n_buckets) where has_bias */
    double shared_share;                              /* where has_shared */
} stats_row;

/* Hierarchical MoE: max / mean over the G equal groups of tokens[nb] of their sums
 * (0 when there are no tokens), the primary gate's balance. */
double stats_group_max_over_mean(const int64_t *tokens, int nb, int G);

/* ---- writer ---- */

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

/* ---- reader ---- */

/* One layer's rows as read back: every scalar column as doubles. */
typedef struct {
    char name[32], kind[32], bucket[32];
    int layer, nb, k, n_aux, zb, sb;  /* zb, sb: the record has z_hist, sigma_hist */
    int groups;                       /* attribute groups (hierarchical MoE), 0 without */
    char aux[STATS_MAX_AUX][40];
    int64_t *tokens;                  /* (rows, nb) */
    double *v[STATS_N_COLUMNS];       /* (rows) per scalar column (v[STATS_COL_TOKENS] NULL) */
    double *auxv[STATS_MAX_AUX];      /* (rows) per aux loss */
    double *bias;                     /* (rows, nb) where the record has bias, else NULL */
    double *shared;                   /* (rows) where the record has shared_share, else NULL */
} stats_layer_data;

typedef struct {
    int64_t rows;     /* rows every dataset holds */
    int64_t *step;    /* (rows) */
    int n;            /* layers, in layer order */
    stats_layer_data *L;
} stats_data;

typedef enum {
    STATS_READ_OK = 0,
    STATS_READ_MISSING, /* no such file */
    STATS_READ_NOT_HDF5,
    STATS_READ_FOREIGN, /* HDF5, but not a stats file of this version */
    STATS_READ_BROKEN   /* a stats file that cannot be read (now) */
} stats_read_status;

/* Read the whole file (while a writer appends, too): STATS_READ_OK, or a status and
 * a one-line message in err. */
stats_read_status stats_read(const char *path, stats_data *r, char *err, size_t cap);
void stats_data_free(stats_data *r);

#endif
