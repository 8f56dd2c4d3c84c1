/* statsfile: stats.h5, its schema, writer and reader (see statsfile.h, docs/stats.md). */
#define _POSIX_C_SOURCE 200809L
#include "infmoe/statsfile.h"

#include <hdf5.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "infmoe/h5util.h"
#include "infmoe/util.h"

/* ======================================================================
 * The schema: what each scalar column of a record holds (docs/stats.md)
 * ====================================================================== */

const stats_column_info stats_columns[STATS_N_COLUMNS] = {
    {"tokens", 1, "kept assignments per bucket (expert or unit block), global"},
    {"n_tokens", 1, "tokens routed by the layer in the step, global"},
    {"dropped", 1, "assignments over capacity"},
    {"dropped_fraction", 0, "dropped / (n_tokens x k)"},
    {"gate_entropy", 0, "mean over tokens of the entropy (nats) of the k gates normalised to sum 1"},
    {"router_entropy", 0, "mean over tokens of the entropy (nats) of the clean router softmax"},
    {"confidence", 0, "mean over tokens of the first choice's gate"},
    {"cv", 0, "population std / mean of tokens over buckets"},
    {"max_over_mean", 0, "max / mean of tokens over buckets"},
    {"unused", 1, "buckets with no token"},
    {"top20_share", 0, "share of kept assignments taken by the busiest 20% of buckets"},
    {"bottom20_share", 0, "share of kept assignments taken by the idlest 20% of buckets"},
    {"t_route", 0, "seconds per step in routing (mean since the previous row, max over ranks)"},
    {"t_dispatch", 0, "seconds per step packing and combining rows (as t_route)"},
    {"t_alltoall", 0, "seconds per step in the dispatch all-to-alls (as t_route)"},
    {"t_expert", 0, "seconds per step in expert compute (as t_route)"},
    {"mean_sigma", 0, "infinite: mean router sigma over tokens and latent dimensions (else 0)"},
    {"mask_overlap", 0, "infinite: mean share of sample 1's kept blocks that sample 2 keeps too (K > 1; else 0)"},
    {"active_units", 0, "infinite: mean units a token uses, union over its samples (else 0)"},
};

/* ---- derived metrics of one row's bucket counts ---- */

typedef struct {
    double cv, max_over_mean, top20, bottom20;
    int64_t unused;
} derived;

static int cmp_desc_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x < y) - (x > y);
}

/* Share of `total` held by the first x (fractional) entries of sorted v. */
static double share_of_first(const int64_t *v, int n, double x, double total) {
    double s = 0.0;
    int whole = (int)floor(x);
    for (int i = 0; i < whole && i < n; i++) s += (double)v[i];
    if (whole < n) s += (x - whole) * (double)v[whole];
    return s / total;
}

static derived derive(const int64_t *tokens, int n) {
    derived r = {0, 0, 0, 0, 0};
    double total = 0.0, max = 0.0;
    for (int i = 0; i < n; i++) {
        total += (double)tokens[i];
        if ((double)tokens[i] > max) max = (double)tokens[i];
        r.unused += tokens[i] == 0;
    }
    if (n == 0 || total <= 0.0) return r;
    double mean = total / n, var = 0.0;
    for (int i = 0; i < n; i++) var += ((double)tokens[i] - mean) * ((double)tokens[i] - mean);
    r.cv = sqrt(var / n) / mean;
    r.max_over_mean = max / mean;
    int64_t *sorted = xmalloc(sizeof(int64_t) * (size_t)n);
    memcpy(sorted, tokens, sizeof(int64_t) * (size_t)n);
    qsort(sorted, (size_t)n, sizeof(int64_t), cmp_desc_i64);
    r.top20 = share_of_first(sorted, n, 0.2 * n, total);
    for (int i = 0; i < n / 2; i++) { /* ascending */
        int64_t t = sorted[i];
        sorted[i] = sorted[n - 1 - i];
        sorted[n - 1 - i] = t;
    }
    r.bottom20 = share_of_first(sorted, n, 0.2 * n, total);
    free(sorted);
    return r;
}

/* String attribute into buf; -1 if missing or not a string. */
static int attr_get_str(hid_t obj, const char *name, char *buf, size_t cap) {
    char *s = h5_attr_get_str(obj, name);
    if (!s) return -1;
    snprintf(buf, cap, "%s", s);
    free(s);
    return 0;
}

/* ======================================================================
 * Writer
 * ====================================================================== */

/*
 * A layer's rows: one compound record per row, every field 8-byte values,
 * packed: tokens[n_buckets], the scalar columns (stats_columns[1..STATS_N_COLUMNS) then
 * aux_<name>), then z_hist[z_bins], sigma_hist[sigma_bins], bias[n_buckets]
 * (doubles) and shared_share (a double) when present.
 */
typedef struct {
    stats_layer_desc d;
    char kind[32], bucket[32], aux[STATS_MAX_AUX][32];
    hid_t ds, ftype, mtype;
    int n_cols;              /* scalar columns */
    size_t rec_size, off_col, off_z, off_sigma, off_bias, off_shared;
    unsigned char *rec;      /* one record, memory layout */
} wlayer;

struct stats_writer {
    hid_t f, step;
    int n;
    wlayer *L;
    int64_t rows;
    char path[1200];
};

static hid_t array_i64(int n, int native) {
    hsize_t dim = (hsize_t)n;
    return h5_check(H5Tarray_create2(native ? H5T_NATIVE_INT64 : H5T_STD_I64LE, 1, &dim));
}

static hid_t record_type(const wlayer *w, int native) {
    hid_t t = h5_check(H5Tcreate(H5T_COMPOUND, w->rec_size));
    hid_t a = array_i64(w->d.n_buckets, native);
    h5_check(H5Tinsert(t, "tokens", 0, a));
    H5Tclose(a);
    for (int c = 0; c < w->n_cols; c++) {
        char nm[48];
        int is_int = 0;
        if (c < STATS_N_COLUMNS - 1) {
            snprintf(nm, sizeof nm, "%s", stats_columns[c + 1].name);
            is_int = stats_columns[c + 1].is_int;
        } else {
            snprintf(nm, sizeof nm, "aux_%s", w->aux[c - (STATS_N_COLUMNS - 1)]);
        }
        h5_check(H5Tinsert(t, nm, w->off_col + 8 * (size_t)c,
                           is_int ? (native ? H5T_NATIVE_INT64 : H5T_STD_I64LE)
                                  : (native ? H5T_NATIVE_DOUBLE : H5T_IEEE_F64LE)));
    }
    if (w->d.z_bins > 0) {
        a = array_i64(w->d.z_bins, native);
        h5_check(H5Tinsert(t, "z_hist", w->off_z, a));
        H5Tclose(a);
    }
    if (w->d.sigma_bins > 0) {
        a = array_i64(w->d.sigma_bins, native);
        h5_check(H5Tinsert(t, "sigma_hist", w->off_sigma, a));
        H5Tclose(a);
    }
    if (w->d.has_bias) {
        hsize_t dim = (hsize_t)w->d.n_buckets;
        a = h5_check(H5Tarray_create2(native ? H5T_NATIVE_DOUBLE : H5T_IEEE_F64LE, 1, &dim));
        h5_check(H5Tinsert(t, "bias", w->off_bias, a));
        H5Tclose(a);
    }
    if (w->d.has_shared)
        h5_check(H5Tinsert(t, "shared_share", w->off_shared, native ? H5T_NATIVE_DOUBLE : H5T_IEEE_F64LE));
    return t;
}

static void layer_plan(wlayer *w, const stats_layer_desc *d) {
    memset(w, 0, sizeof *w);
    w->d = *d;
    snprintf(w->kind, sizeof w->kind, "%s", d->kind ? d->kind : "");
    snprintf(w->bucket, sizeof w->bucket, "%s", d->bucket ? d->bucket : "expert");
    w->d.kind = w->kind;
    w->d.bucket = w->bucket;
    ALWAYS(d->n_aux >= 0 && d->n_aux <= STATS_MAX_AUX && d->n_buckets >= 1);
    for (int a = 0; a < d->n_aux; a++) {
        snprintf(w->aux[a], sizeof w->aux[a], "%s", d->aux_names[a]);
        w->d.aux_names[a] = w->aux[a];
    }
    w->n_cols = STATS_N_COLUMNS - 1 + d->n_aux;
    w->off_col = 8 * (size_t)d->n_buckets;
    w->off_z = w->off_col + 8 * (size_t)w->n_cols;
    w->off_sigma = w->off_z + 8 * (size_t)(d->z_bins > 0 ? d->z_bins : 0);
    w->off_bias = w->off_sigma + 8 * (size_t)(d->sigma_bins > 0 ? d->sigma_bins : 0);
    w->off_shared = w->off_bias + 8 * (size_t)(d->has_bias ? d->n_buckets : 0);
    w->rec_size = w->off_shared + 8 * (size_t)(d->has_shared ? 1 : 0);
    w->ftype = record_type(w, 0);
    w->mtype = record_type(w, 1);
    w->rec = xcalloc(w->rec_size, 1);
    w->ds = -1;
}

static void close_datasets(stats_writer *w) {
    for (int l = 0; l < w->n; l++)
        if (w->L[l].ds >= 0) {
            H5Dclose(w->L[l].ds);
            w->L[l].ds = -1;
        }
    if (w->step >= 0) H5Dclose(w->step);
    w->step = -1;
}

static int open_datasets(stats_writer *w, char *err, size_t cap) {
    w->step = H5Lexists(w->f, "step", H5P_DEFAULT) > 0 ? H5Dopen2(w->f, "step", H5P_DEFAULT) : -1;
    if (w->step < 0) {
        snprintf(err, cap, "%s: no /step dataset", w->path);
        return -1;
    }
    for (int l = 0; l < w->n; l++) {
        wlayer *L = &w->L[l];
        char grp[48], g[64];
        snprintf(grp, sizeof grp, "layers/h.%d", L->d.layer);
        snprintf(g, sizeof g, "layers/h.%d/rows", L->d.layer);
        int exists = H5Lexists(w->f, "layers", H5P_DEFAULT) > 0 && H5Lexists(w->f, grp, H5P_DEFAULT) > 0 &&
                     H5Lexists(w->f, g, H5P_DEFAULT) > 0;
        hid_t ds = exists ? H5Dopen2(w->f, g, H5P_DEFAULT) : -1;
        hid_t t = ds >= 0 ? H5Dget_type(ds) : -1;
        int same = t >= 0 && H5Tequal(t, L->ftype) > 0;
        if (t >= 0) H5Tclose(t);
        if (!same) {
            if (ds >= 0) H5Dclose(ds);
            snprintf(err, cap, "%s: /%s is missing or holds other fields (the run's layers differ)",
                     w->path, g);
            return -1;
        }
        L->ds = ds;
    }
    return 0;
}

static int create_file(stats_writer *w, const char *config_text, char *err, size_t cap) {
    unlink(w->path); /* a reader may hold the old file: it keeps its copy */
    hid_t fapl = h5_fapl_latest(1);
    w->f = H5Fcreate(w->path, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    H5Pclose(fapl);
    if (w->f < 0) {
        snprintf(err, cap, "cannot create %s", w->path);
        return -1;
    }
    int bad = h5_attr_put_str(w->f, "format", STATS_FORMAT) < 0 ||
              h5_attr_put_i64(w->f, "format_version", STATS_FORMAT_VERSION) < 0 ||
              h5_attr_put_str(w->f, "config", config_text ? config_text : "") < 0;
    hid_t s = h5_ds_create_rows(w->f, "step", H5T_STD_I64LE, 1, "optimizer steps completed at each row");
    bad |= s < 0;
    if (s >= 0) H5Dclose(s);
    hid_t layers = H5Gcreate2(w->f, "layers", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    bad |= layers < 0;
    for (int l = 0; l < w->n && !bad; l++) {
        wlayer *L = &w->L[l];
        char g[32];
        snprintf(g, sizeof g, "h.%d", L->d.layer);
        hid_t grp = H5Gcreate2(layers, g, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        if (grp < 0) {
            bad = 1;
            break;
        }
        bad |= h5_attr_put_i64(grp, "layer", L->d.layer) < 0 || h5_attr_put_str(grp, "kind", L->kind) < 0 ||
               h5_attr_put_str(grp, "bucket", L->bucket) < 0 ||
               h5_attr_put_i64(grp, "n_buckets", L->d.n_buckets) < 0 || h5_attr_put_i64(grp, "k", L->d.k) < 0;
        if (L->d.groups > 0) bad |= h5_attr_put_i64(grp, "groups", L->d.groups) < 0;
        hid_t ds = h5_ds_create_rows(grp, "rows", L->ftype, 1,
                             "one record per row of /step: tokens per bucket and the scalars of docs/stats.md");
        bad |= ds < 0;
        if (ds >= 0 && L->d.z_bins > 0)
            bad |= h5_attr_put_f64(ds, "z_lo", L->d.z_lo) < 0 || h5_attr_put_f64(ds, "z_hi", L->d.z_hi) < 0;
        if (ds >= 0 && L->d.sigma_bins > 0)
            bad |= h5_attr_put_f64(ds, "sigma_lo", L->d.sigma_lo) < 0 || h5_attr_put_f64(ds, "sigma_hi", L->d.sigma_hi) < 0;
        if (ds >= 0) H5Dclose(ds);
        H5Gclose(grp);
    }
    if (layers >= 0) H5Gclose(layers);
    if (bad) {
        snprintf(err, cap, "cannot lay out %s", w->path);
        return -1;
    }
    w->rows = 0;
    return 0;
}

/* Reopen after a stop or crash: clear a dead writer's flags, drop rows after resume_step. */
static int reopen_file(stats_writer *w, int64_t resume_step, char *err, size_t cap) {
    hid_t fapl = h5_fapl_latest(1);
    hbool_t clear = 1; /* what h5clear does: the flags a killed SWMR writer leaves */
    h5_check(H5Pset(fapl, "clear_status_flags", &clear));
    w->f = -1;
    for (int tries = 0; tries < 50 && w->f < 0; tries++) { /* a non-SWMR reader may hold a lock */
        w->f = H5Fopen(w->path, H5F_ACC_RDWR, fapl);
        if (w->f < 0) {
            struct timespec ts = {0, 100 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
    }
    H5Pclose(fapl);
    if (w->f < 0) {
        snprintf(err, cap, "%s: not a readable HDF5 file, or locked by another process", w->path);
        return -1;
    }
    char fmt[64] = "";
    int64_t version = 0;
    if (attr_get_str(w->f, "format", fmt, sizeof fmt) < 0 || strcmp(fmt, STATS_FORMAT) != 0 ||
        h5_attr_get_i64(w->f, "format_version", &version) < 0 || version != STATS_FORMAT_VERSION) {
        snprintf(err, cap, "%s: not an infmoe stats file of format version %d", w->path,
                 STATS_FORMAT_VERSION);
        return -1;
    }
    if (open_datasets(w, err, cap) < 0) return -1;
    /* rows every dataset holds (a crash can leave some one row longer than others) */
    int64_t rows = h5_ds_rows(w->step);
    for (int l = 0; l < w->n; l++) {
        int64_t r = h5_ds_rows(w->L[l].ds);
        if (r < rows) rows = r;
    }
    int64_t *steps = xcalloc((size_t)(rows > 0 ? rows : 1), sizeof(int64_t));
    if (h5_ds_read_rows(w->step, rows, 1, H5T_NATIVE_INT64, steps) < 0) {
        free(steps);
        snprintf(err, cap, "%s: cannot read /step", w->path);
        return -1;
    }
    int64_t keep = 0;
    while (keep < rows && steps[keep] <= resume_step && (keep == 0 || steps[keep] > steps[keep - 1]))
        keep++;
    free(steps);
    hsize_t dims = (hsize_t)keep;
    int bad = H5Dset_extent(w->step, &dims) < 0;
    for (int l = 0; l < w->n; l++) bad |= H5Dset_extent(w->L[l].ds, &dims) < 0;
    if (bad) {
        snprintf(err, cap, "%s: cannot drop the rows after step %lld", w->path, (long long)resume_step);
        return -1;
    }
    w->rows = keep;
    return 0;
}

static void writer_free(stats_writer *w) {
    if (!w) return;
    close_datasets(w);
    if (w->f >= 0) H5Fclose(w->f);
    for (int l = 0; l < w->n; l++) {
        H5Tclose(w->L[l].ftype);
        H5Tclose(w->L[l].mtype);
        free(w->L[l].rec);
    }
    free(w->L);
    free(w);
}

stats_writer *stats_writer_open(const char *path, const stats_layer_desc *layers, int n_layers,
                                int64_t resume_step, const char *config_text, char *err,
                                size_t errcap) {
    h5_quiet();
    stats_writer *w = xcalloc(1, sizeof *w);
    w->f = w->step = -1;
    snprintf(w->path, sizeof w->path, "%s", path);
    w->n = n_layers;
    w->L = xcalloc((size_t)(n_layers > 0 ? n_layers : 1), sizeof(wlayer));
    for (int l = 0; l < n_layers; l++) layer_plan(&w->L[l], &layers[l]);
    struct stat st;
    int rc;
    if (resume_step >= 0 && stat(path, &st) == 0)
        rc = reopen_file(w, resume_step, err, errcap);
    else
        rc = create_file(w, config_text, err, errcap);
    /* SWMR from here on: no new objects; readers may open the file */
    if (rc == 0) {
        close_datasets(w);
        if (H5Fstart_swmr_write(w->f) < 0) {
            snprintf(err, errcap, "%s: cannot start SWMR writing", path);
            rc = -1;
        }
    }
    if (rc == 0) rc = open_datasets(w, err, errcap);
    if (rc == 0 && H5Fflush(w->f, H5F_SCOPE_LOCAL) < 0) {
        snprintf(err, errcap, "%s: cannot flush", path);
        rc = -1;
    }
    if (rc < 0) {
        writer_free(w);
        return NULL;
    }
    return w;
}

double stats_group_max_over_mean(const int64_t *tokens, int nb, int G) {
    const int b = nb / G;
    double hi = 0.0, total = 0.0;
    for (int g = 0; g < G; g++) {
        double sg = 0.0;
        for (int e = g * b; e < (g + 1) * b; e++) sg += (double)tokens[e];
        hi = sg > hi ? sg : hi;
        total += sg;
    }
    return total > 0 ? hi / (total / G) : 0.0;
}

int stats_writer_append(stats_writer *w, int64_t step, const stats_row *rows) {
    hsize_t r = (hsize_t)w->rows;
    for (int l = 0; l < w->n; l++) {
        wlayer *L = &w->L[l];
        const stats_row *x = &rows[l];
        if (!x->tokens || (L->d.z_bins > 0 && !x->z_hist) || (L->d.sigma_bins > 0 && !x->sigma_hist) ||
            (L->d.has_bias && !x->bias))
            return -1;
        derived dv = derive(x->tokens, L->d.n_buckets);
        int64_t iv[STATS_N_COLUMNS] = {0};
        double fv[STATS_N_COLUMNS] = {0};
        iv[STATS_COL_N_TOKENS] = x->n_tokens;
        iv[STATS_COL_DROPPED] = x->dropped;
        iv[STATS_COL_UNUSED] = dv.unused;
        fv[STATS_COL_DROPPED_FRAC] = x->assignments > 0 ? (double)x->dropped / (double)x->assignments : 0.0;
        fv[STATS_COL_GATE_ENT] = x->gate_entropy;
        fv[STATS_COL_ROUTER_ENT] = x->router_entropy;
        fv[STATS_COL_CONFIDENCE] = x->top_gate;
        fv[STATS_COL_CV] = dv.cv;
        fv[STATS_COL_MAX_MEAN] = dv.max_over_mean;
        fv[STATS_COL_TOP20] = dv.top20;
        fv[STATS_COL_BOTTOM20] = dv.bottom20;
        fv[STATS_COL_T_ROUTE] = x->t_route;
        fv[STATS_COL_T_DISPATCH] = x->t_dispatch;
        fv[STATS_COL_T_ALLTOALL] = x->t_alltoall;
        fv[STATS_COL_T_EXPERT] = x->t_expert;
        fv[STATS_COL_SIGMA] = x->mean_sigma;
        fv[STATS_COL_OVERLAP] = x->mask_overlap;
        fv[STATS_COL_ACTIVE] = x->active_units;
        memcpy(L->rec, x->tokens, 8 * (size_t)L->d.n_buckets);
        for (int s = 1; s < STATS_N_COLUMNS; s++)
            memcpy(L->rec + L->off_col + 8 * (size_t)(s - 1), stats_columns[s].is_int ? (void *)&iv[s] : (void *)&fv[s], 8);
        for (int a = 0; a < L->d.n_aux; a++)
            memcpy(L->rec + L->off_col + 8 * (size_t)(STATS_N_COLUMNS - 1 + a), &x->aux[a], 8);
        if (L->d.z_bins > 0) memcpy(L->rec + L->off_z, x->z_hist, 8 * (size_t)L->d.z_bins);
        if (L->d.sigma_bins > 0) memcpy(L->rec + L->off_sigma, x->sigma_hist, 8 * (size_t)L->d.sigma_bins);
        if (L->d.has_bias) memcpy(L->rec + L->off_bias, x->bias, 8 * (size_t)L->d.n_buckets);
        if (L->d.has_shared) memcpy(L->rec + L->off_shared, &x->shared_share, 8);
        if (h5_ds_append_row(L->ds, r, 1, L->mtype, L->rec) < 0) return -1;
    }
    /* /step last: a reader takes the rows every dataset has */
    if (h5_ds_append_row(w->step, r, 1, H5T_NATIVE_INT64, &step) < 0) return -1;
    if (H5Fflush(w->f, H5F_SCOPE_LOCAL) < 0) return -1;
    w->rows++;
    return 0;
}

int64_t stats_writer_rows(const stats_writer *w) { return w->rows; }

void stats_writer_close(stats_writer *w) { writer_free(w); }

/* ======================================================================
 * Reader
 * ====================================================================== */

void stats_data_free(stats_data *r) {
    for (int l = 0; l < r->n; l++) {
        free(r->L[l].tokens);
        for (int i = 0; i < STATS_N_COLUMNS; i++) free(r->L[l].v[i]);
        for (int a = 0; a < r->L[l].n_aux; a++) free(r->L[l].auxv[a]);
        free(r->L[l].bias);
        free(r->L[l].shared);
    }
    free(r->L);
    free(r->step);
    memset(r, 0, sizeof *r);
}

static herr_t collect_name(hid_t g, const char *name, const H5L_info_t *info, void *op) {
    (void)g;
    (void)info;
    stats_data *r = op;
    int layer;
    char tail;
    if (sscanf(name, "h.%d%c", &layer, &tail) != 1) return 0;
    r->L = xrealloc(r->L, sizeof(stats_layer_data) * (size_t)(r->n + 1));
    stats_layer_data *L = &r->L[r->n++];
    memset(L, 0, sizeof *L);
    snprintf(L->name, sizeof L->name, "%s", name);
    L->layer = layer;
    return 0;
}

static int cmp_layer(const void *a, const void *b) {
    return ((const stats_layer_data *)a)->layer - ((const stats_layer_data *)b)->layer;
}

/*
 * A SWMR reader retries a metadata read whose checksum fails, since a writer may be
 * halfway through a flush, with waits that double from 1 ns; HDF5's default of 100
 * tries never ends on a damaged file. 30 tries wait about a second in all (2^30 ns),
 * far more than a flush takes.
 */
enum { SWMR_READ_ATTEMPTS = 30 };

/* What HDF5 reported while this reader read: a checksum mismatch, a truncation, or
 * "". HDF5 calls note_failure at each failing call, before a later call clears
 * its error stack, so damage found deep in a read is not lost. */
static const char *g_damage = "";
static const char STATS_TRUNCATED[] = "truncated";

static herr_t note_damage(unsigned n, const H5E_error2_t *e, void *data) {
    (void)n;
    (void)data;
    if (e->desc && strstr(e->desc, "checksum")) g_damage = "a checksum does not match";
    else if (e->min_num == H5E_TRUNCATED && !g_damage[0]) g_damage = STATS_TRUNCATED;
    return 0;
}

static herr_t note_failure(hid_t stack, void *data) {
    (void)data;
    return H5Ewalk2(stack, H5E_WALK_DOWNWARD, note_damage, NULL);
}

/* err = "PATH: damaged stats file (PART[: DAMAGE])": a read of PART failed. */
static void damaged(char *err, size_t cap, const char *path, const char *part) {
    snprintf(err, cap, "%s: damaged stats file (%s%s%s)", path, part, g_damage[0] ? ": " : "",
             g_damage);
}

/* Open path as a stats file of this format version: the file, or -1 with a status and err. */
static hid_t open_stats_file(const char *path, stats_read_status *rc, char *err, size_t cap) {
    struct stat st;
    *rc = STATS_READ_OK;
    if (stat(path, &st) != 0) {
        snprintf(err, cap, "%s: no such file", path);
        *rc = STATS_READ_MISSING;
        return -1;
    }
    if (S_ISDIR(st.st_mode)) {
        snprintf(err, cap, "%s: a directory, not a stats file (try %s/stats.h5)", path, path);
        *rc = STATS_READ_NOT_HDF5;
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        snprintf(err, cap, "%s: not a regular file (a FIFO or device), not a stats file", path);
        *rc = STATS_READ_NOT_HDF5;
        return -1;
    }
    if (st.st_size == 0) { /* a run creating it has not flushed yet */
        snprintf(err, cap, "%s: an empty file, not a stats file yet", path);
        *rc = STATS_READ_MISSING;
        return -1;
    }
    g_damage = "";
    H5Eset_auto2(H5E_DEFAULT, note_failure, NULL);
    hid_t fapl = h5_fapl_latest(0);
    h5_check(H5Pset_metadata_read_attempts(fapl, SWMR_READ_ATTEMPTS));
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY | H5F_ACC_SWMR_READ, fapl);
    if (f < 0 && !g_damage[0]) f = H5Fopen(path, H5F_ACC_RDONLY, fapl); /* files of older formats */
    H5Pclose(fapl);
    if (f < 0) {
        htri_t is = H5Fis_hdf5(path);
        if (is <= 0)
            snprintf(err, cap, "%s: not an HDF5 file (%lld bytes)", path, (long long)st.st_size);
        else if (g_damage == STATS_TRUNCATED)
            snprintf(err, cap, "%s: truncated stats file: %lld bytes, fewer than its superblock "
                     "records (damaged, or still being copied)", path, (long long)st.st_size);
        else if (g_damage[0])
            damaged(err, cap, path, "its superblock");
        else
            snprintf(err, cap, "%s: an HDF5 file that cannot be opened now (a run setting it up?)", path);
        *rc = is <= 0 ? STATS_READ_NOT_HDF5 : STATS_READ_BROKEN;
        return -1;
    }
    char fmt[64] = "";
    int64_t version = 0;
    int no_format = attr_get_str(f, "format", fmt, sizeof fmt) < 0;
    if (no_format && g_damage[0]) {
        damaged(err, cap, path, "its root attributes");
        *rc = STATS_READ_BROKEN;
    } else if (no_format || strcmp(fmt, STATS_FORMAT) != 0) {
        snprintf(err, cap, "%s: an HDF5 file but not an infmoe stats file (no format attribute '%s')",
                 path, STATS_FORMAT);
        *rc = STATS_READ_FOREIGN;
    } else if (h5_attr_get_i64(f, "format_version", &version) < 0 || version != STATS_FORMAT_VERSION) {
        snprintf(err, cap, "%s: stats format version %lld; this infmoe reads version %d", path,
                 (long long)version, STATS_FORMAT_VERSION);
        *rc = STATS_READ_FOREIGN;
    }
    if (*rc != STATS_READ_OK) {
        H5Fclose(f);
        return -1;
    }
    return f;
}

/* Layer L's attributes from its group, and its rows dataset (-1 when it is damaged). */
static hid_t open_layer(hid_t layers, stats_layer_data *L) {
    hid_t g = H5Gopen2(layers, L->name, H5P_DEFAULT), rows = -1;
    int64_t v = 0;
    if (g >= 0 && h5_attr_get_i64(g, "n_buckets", &v) == 0 && v >= 1 && H5Lexists(g, "rows", H5P_DEFAULT) > 0) {
        L->nb = (int)v;
        L->k = h5_attr_get_i64(g, "k", &v) == 0 ? (int)v : 0;
        /* buckets that divide into groups: hierarchical MoE; a bad value reads as none */
        L->groups = h5_attr_get_i64(g, "groups", &v) == 0 && v >= 2 && v <= L->nb && L->nb % v == 0 ? (int)v : 0;
        if (attr_get_str(g, "kind", L->kind, sizeof L->kind) < 0) snprintf(L->kind, sizeof L->kind, "?");
        if (attr_get_str(g, "bucket", L->bucket, sizeof L->bucket) < 0)
            snprintf(L->bucket, sizeof L->bucket, "expert");
        rows = H5Dopen2(g, "rows", H5P_DEFAULT);
    }
    if (g >= 0) H5Gclose(g);
    return rows;
}

/*
 * Rows [0, n) of layer L's records into L: the record's fields are found by
 * name (tokens as int64[nb], every scalar column and aux_<name> as a double), so
 * a file whose columns are in another order still reads. 0, or -1 when a column
 * is missing or the read fails.
 */
static int read_layer_rows(hid_t ds, stats_layer_data *L, int64_t n) {
    int64_t n1 = n > 0 ? n : 1;
    hid_t ft = H5Dget_type(ds); /* the file's types: a damaged file fails here, not the job */
    if (ft < 0) return -1;
    int nm = H5Tget_class(ft) == H5T_COMPOUND ? H5Tget_nmembers(ft) : 0;
    /* memory record: tokens, a double per member (at 8 nb + 8 c), then bias[nb] */
    const size_t off_bias = 8 * (size_t)L->nb + 8 * (size_t)(nm > 0 ? nm : 1);
    size_t row_bytes = off_bias + 8 * (size_t)L->nb;
    int have_bias = 0, shared_at = -1;
    hid_t mt = h5_check(H5Tcreate(H5T_COMPOUND, row_bytes));
    int *slot = xcalloc((size_t)(nm > 0 ? nm : 1), sizeof(int)); /* column, -1 - aux, 0 none */
    int have_tokens = 0, broken = 0;
    for (int c = 0; c < nm; c++) {
        char *name = H5Tget_member_name(ft, (unsigned)c);
        hid_t mtype = name ? H5Tget_member_type(ft, (unsigned)c) : -1;
        if (mtype < 0) {
            if (name) H5free_memory(name);
            broken = 1;
            break;
        }
        H5T_class_t cls = H5Tget_class(mtype);
        if (strcmp(name, "tokens") == 0 && cls == H5T_ARRAY && H5Tget_array_ndims(mtype) == 1) {
            hsize_t dim = 0;
            if (H5Tget_array_dims2(mtype, &dim) == 1 && (int)dim == L->nb) {
                hid_t a = h5_check(H5Tarray_create2(H5T_NATIVE_INT64, 1, &dim));
                h5_check(H5Tinsert(mt, "tokens", 0, a));
                H5Tclose(a);
                have_tokens = 1;
            }
        } else if (strcmp(name, "bias") == 0 && cls == H5T_ARRAY && H5Tget_array_ndims(mtype) == 1) {
            hsize_t dim = 0;
            if (H5Tget_array_dims2(mtype, &dim) == 1 && (int)dim == L->nb) {
                hid_t a = h5_check(H5Tarray_create2(H5T_NATIVE_DOUBLE, 1, &dim));
                h5_check(H5Tinsert(mt, "bias", off_bias, a));
                H5Tclose(a);
                have_bias = 1;
            }
        } else if (strcmp(name, "shared_share") == 0 && cls == H5T_FLOAT) {
            h5_check(H5Tinsert(mt, name, 8 * (size_t)L->nb + 8 * (size_t)c, H5T_NATIVE_DOUBLE));
            shared_at = c;
        } else if (strcmp(name, "z_hist") == 0) {
            L->zb = 1;
        } else if (strcmp(name, "sigma_hist") == 0) {
            L->sb = 1;
        } else if (cls == H5T_INTEGER || cls == H5T_FLOAT) {
            for (int s = 1; s < STATS_N_COLUMNS; s++)
                if (strcmp(name, stats_columns[s].name) == 0) slot[c] = s;
            if (!slot[c] && strncmp(name, "aux_", 4) == 0 && L->n_aux < STATS_MAX_AUX) {
                snprintf(L->aux[L->n_aux], sizeof L->aux[0], "%s", name + 4);
                slot[c] = -1 - L->n_aux++;
            }
            if (slot[c]) h5_check(H5Tinsert(mt, name, 8 * (size_t)L->nb + 8 * (size_t)c, H5T_NATIVE_DOUBLE));
        }
        H5Tclose(mtype);
        H5free_memory(name);
    }
    int ok = have_tokens && !broken;
    for (int s = 1; s < STATS_N_COLUMNS; s++) {
        int found = 0;
        for (int c = 0; c < nm; c++) found |= slot[c] == s;
        ok &= found;
    }
    L->tokens = xcalloc((size_t)(n1 * L->nb), sizeof(int64_t));
    for (int s = 1; s < STATS_N_COLUMNS; s++) L->v[s] = xcalloc((size_t)n1, sizeof(double));
    for (int a = 0; a < L->n_aux; a++) L->auxv[a] = xcalloc((size_t)n1, sizeof(double));
    if (have_bias) L->bias = xcalloc((size_t)(n1 * L->nb), sizeof(double));
    if (shared_at >= 0) L->shared = xcalloc((size_t)n1, sizeof(double));
    unsigned char *buf = xcalloc((size_t)n1, row_bytes);
    ok = ok && h5_ds_read_rows(ds, n, 1, mt, buf) == 0;
    for (int64_t i = 0; i < n && ok; i++) {
        const unsigned char *row = buf + (size_t)i * row_bytes;
        memcpy(L->tokens + i * L->nb, row, 8 * (size_t)L->nb);
        for (int c = 0; c < nm; c++) {
            double x;
            memcpy(&x, row + 8 * (size_t)L->nb + 8 * (size_t)c, 8);
            if (slot[c] > 0) L->v[slot[c]][i] = x;
            else if (slot[c] < 0) L->auxv[-1 - slot[c]][i] = x;
            else if (c == shared_at) L->shared[i] = x;
        }
        if (have_bias) memcpy(L->bias + i * L->nb, row + off_bias, 8 * (size_t)L->nb);
    }
    free(buf);
    free(slot);
    H5Tclose(mt);
    H5Tclose(ft);
    return ok ? 0 : -1;
}

stats_read_status stats_read(const char *path, stats_data *r, char *err, size_t cap) {
    memset(r, 0, sizeof *r);
    stats_read_status rc;
    hid_t f = open_stats_file(path, &rc, err, cap);
    if (f < 0) {
        h5_quiet();
        return rc;
    }
    hid_t sd = H5Lexists(f, "step", H5P_DEFAULT) > 0 ? H5Dopen2(f, "step", H5P_DEFAULT) : -1;
    hid_t lg = H5Lexists(f, "layers", H5P_DEFAULT) > 0 ? H5Gopen2(f, "layers", H5P_DEFAULT) : -1;
    hid_t *rd = NULL;
    if (sd < 0 || lg < 0) {
        damaged(err, cap, path, "no /step or /layers");
        rc = STATS_READ_BROKEN;
        goto done;
    }
    r->rows = h5_ds_rows(sd);
    H5Literate(lg, H5_INDEX_NAME, H5_ITER_INC, NULL, collect_name, r);
    qsort(r->L, (size_t)r->n, sizeof(stats_layer_data), cmp_layer);
    /* shapes, and the rows every dataset holds (a writer may be one row ahead in some) */
    rd = xcalloc((size_t)(r->n > 0 ? r->n : 1), sizeof(hid_t));
    for (int l = 0; l < r->n; l++) rd[l] = -1;
    for (int l = 0; l < r->n; l++) {
        rd[l] = open_layer(lg, &r->L[l]);
        if (rd[l] < 0) {
            char part[64];
            snprintf(part, sizeof part, "layer %s", r->L[l].name);
            damaged(err, cap, path, part);
            rc = STATS_READ_BROKEN;
            goto done;
        }
        int64_t a = h5_ds_rows(rd[l]);
        if (a < r->rows) r->rows = a;
    }
    r->step = xcalloc((size_t)(r->rows > 0 ? r->rows : 1), sizeof(int64_t));
    int bad = h5_ds_read_rows(sd, r->rows, 1, H5T_NATIVE_INT64, r->step) < 0;
    for (int l = 0; l < r->n && !bad; l++) bad = read_layer_rows(rd[l], &r->L[l], r->rows) < 0;
    if (bad) {
        damaged(err, cap, path, "its rows cannot be read");
        rc = STATS_READ_BROKEN;
    }
done:
    for (int l = 0; l < r->n && rd; l++)
        if (rd[l] >= 0) H5Dclose(rd[l]);
    free(rd);
    if (lg >= 0) H5Gclose(lg);
    if (sd >= 0) H5Dclose(sd);
    H5Fclose(f);
    if (rc == STATS_READ_OK && g_damage[0]) { /* a part read around the damage, e.g. an attribute */
        damaged(err, cap, path, "its metadata");
        rc = STATS_READ_BROKEN;
    }
    h5_quiet();
    if (rc != STATS_READ_OK) stats_data_free(r);
    return rc;
}
