/* stats: routing statistics in stats.h5 (SWMR) and `infmoe stats` (see stats.h, docs/stats.md). */
#define _POSIX_C_SOURCE 200809L
#include "infmoe/stats.h"

#include <errno.h>
#include <hdf5.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "infmoe/h5util.h"
#include "infmoe/infinite.h"
#include "infmoe/moe.h"
#include "infmoe/util.h"

/* ======================================================================
 * The per-layer series. Every dataset is [rows] or [rows, width], chunked,
 * extendible along rows. The order is the order of writing within a row.
 * ====================================================================== */

enum {
    D_TOKENS, D_N_TOKENS, D_DROPPED, D_DROPPED_FRAC, D_GATE_ENT, D_ROUTER_ENT, D_CONFIDENCE,
    D_CV, D_MAX_MEAN, D_UNUSED, D_TOP20, D_BOTTOM20, D_T_ROUTE, D_T_DISPATCH, D_T_ALLTOALL,
    D_T_EXPERT, D_SIGMA, D_OVERLAP, D_ACTIVE, D_FIXED /* then aux_<name>..., z_hist, sigma_hist */
};

static const struct {
    const char *name;
    int is_int;
    const char *description;
} SERIES[D_FIXED] = {
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

static void quiet_hdf5(void) { H5Eset_auto2(H5E_DEFAULT, NULL, NULL); }

static const char *layer_kind_name(ffn_kind k) {
    return k == FFN_TOPK ? "topk" : k == FFN_MOGE ? "moge" : k == FFN_INFINITE ? "infinite" : "dense";
}

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

/* ---- small HDF5 helpers (every failure is reported by the caller) ---- */

/* String attribute into buf; -1 if missing or not a string. */
static int attr_get_str(hid_t obj, const char *name, char *buf, size_t cap) {
    char *s = h5_attr_get_str(obj, name);
    if (!s) return -1;
    snprintf(buf, cap, "%s", s);
    free(s);
    return 0;
}

static int64_t ds_rows(hid_t ds) {
    hid_t sp = H5Dget_space(ds);
    if (sp < 0) return -1;
    hsize_t dims[2] = {0, 0};
    int nd = H5Sget_simple_extent_dims(sp, dims, NULL);
    H5Sclose(sp);
    return nd < 1 ? -1 : (int64_t)dims[0];
}

/* An empty dataset [0] or [0, width] of ftype, unlimited rows, chunks of about 4 KiB. */
static hid_t ds_create(hid_t group, const char *name, hid_t ftype, int width, const char *descr) {
    int nd = width > 1 ? 2 : 1;
    hsize_t dims[2] = {0, (hsize_t)width}, maxd[2] = {H5S_UNLIMITED, (hsize_t)width};
    size_t row_bytes = H5Tget_size(ftype) * (size_t)width;
    hsize_t rows = (hsize_t)(4096 / row_bytes);
    hsize_t chunk[2] = {rows < 1 ? 1 : rows, (hsize_t)width};
    hid_t sp = H5Screate_simple(nd, dims, maxd);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(dcpl, nd, chunk);
    H5Pset_obj_track_times(dcpl, 0); /* no modification time: one object header write less per row */
    hid_t ds = H5Dcreate2(group, name, ftype, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    H5Pclose(dcpl);
    H5Sclose(sp);
    if (ds >= 0 && descr && h5_attr_put_str(ds, "description", descr) < 0) {
        H5Dclose(ds);
        return -1;
    }
    return ds;
}

/* Grow ds to row+1 rows and write `width` values of memtype at row. */
static int ds_append(hid_t ds, hsize_t row, int width, hid_t memtype, const void *buf) {
    int nd = width > 1 ? 2 : 1;
    hsize_t dims[2] = {row + 1, (hsize_t)width};
    if (H5Dset_extent(ds, dims) < 0) return -1;
    hid_t fsp = H5Dget_space(ds);
    hsize_t start[2] = {row, 0}, count[2] = {1, (hsize_t)width};
    hid_t msp = H5Screate_simple(nd, count, NULL);
    int ok = fsp >= 0 && H5Sselect_hyperslab(fsp, H5S_SELECT_SET, start, NULL, count, NULL) >= 0 &&
             H5Dwrite(ds, memtype, msp, fsp, H5P_DEFAULT, buf) >= 0;
    H5Sclose(msp);
    if (fsp >= 0) H5Sclose(fsp);
    return ok ? 0 : -1;
}

/* Read rows [0, rows) of ds as memtype into buf (width values a row). */
static int ds_read_rows(hid_t ds, int64_t rows, int width, hid_t memtype, void *buf) {
    if (rows <= 0) return 0;
    hid_t fsp = H5Dget_space(ds);
    int nd = fsp >= 0 && H5Sget_simple_extent_ndims(fsp) == 2 ? 2 : 1;
    hsize_t start[2] = {0, 0}, count[2] = {(hsize_t)rows, (hsize_t)width};
    hid_t msp = H5Screate_simple(nd, count, NULL);
    int ok = fsp >= 0 && H5Sselect_hyperslab(fsp, H5S_SELECT_SET, start, NULL, count, NULL) >= 0 &&
             H5Dread(ds, memtype, msp, fsp, H5P_DEFAULT, buf) >= 0;
    H5Sclose(msp);
    if (fsp >= 0) H5Sclose(fsp);
    return ok ? 0 : -1;
}

static hid_t latest_fapl(int locking) {
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    H5Pset_libver_bounds(fapl, H5F_LIBVER_LATEST, H5F_LIBVER_LATEST);
    if (!locking) H5Pset_file_locking(fapl, 0, 1);
    return fapl;
}

/* ======================================================================
 * Writer
 * ====================================================================== */

/*
 * A layer's rows: one compound record per row, every field 8-byte values,
 * packed: tokens[n_buckets], the scalar columns (SERIES[1..D_FIXED) then
 * aux_<name>), then z_hist[z_bins] and sigma_hist[sigma_bins] when present.
 */
typedef struct {
    stats_layer_desc d;
    char kind[32], bucket[32], aux[STATS_MAX_AUX][32];
    hid_t ds, ftype, mtype;
    int n_cols;              /* scalar columns */
    size_t rec_size, off_col, off_z, off_sigma;
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
    return H5Tarray_create2(native ? H5T_NATIVE_INT64 : H5T_STD_I64LE, 1, &dim);
}

static hid_t record_type(const wlayer *w, int native) {
    hid_t t = H5Tcreate(H5T_COMPOUND, w->rec_size);
    hid_t a = array_i64(w->d.n_buckets, native);
    H5Tinsert(t, "tokens", 0, a);
    H5Tclose(a);
    for (int c = 0; c < w->n_cols; c++) {
        char nm[48];
        int is_int = 0;
        if (c < D_FIXED - 1) {
            snprintf(nm, sizeof nm, "%s", SERIES[c + 1].name);
            is_int = SERIES[c + 1].is_int;
        } else {
            snprintf(nm, sizeof nm, "aux_%s", w->aux[c - (D_FIXED - 1)]);
        }
        H5Tinsert(t, nm, w->off_col + 8 * (size_t)c,
                  is_int ? (native ? H5T_NATIVE_INT64 : H5T_STD_I64LE)
                         : (native ? H5T_NATIVE_DOUBLE : H5T_IEEE_F64LE));
    }
    if (w->d.z_bins > 0) {
        a = array_i64(w->d.z_bins, native);
        H5Tinsert(t, "z_hist", w->off_z, a);
        H5Tclose(a);
    }
    if (w->d.sigma_bins > 0) {
        a = array_i64(w->d.sigma_bins, native);
        H5Tinsert(t, "sigma_hist", w->off_sigma, a);
        H5Tclose(a);
    }
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
    w->n_cols = D_FIXED - 1 + d->n_aux;
    w->off_col = 8 * (size_t)d->n_buckets;
    w->off_z = w->off_col + 8 * (size_t)w->n_cols;
    w->off_sigma = w->off_z + 8 * (size_t)(d->z_bins > 0 ? d->z_bins : 0);
    w->rec_size = w->off_sigma + 8 * (size_t)(d->sigma_bins > 0 ? d->sigma_bins : 0);
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
    hid_t fapl = latest_fapl(1);
    w->f = H5Fcreate(w->path, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    H5Pclose(fapl);
    if (w->f < 0) {
        snprintf(err, cap, "cannot create %s", w->path);
        return -1;
    }
    int bad = h5_attr_put_str(w->f, "format", STATS_FORMAT) < 0 ||
              h5_attr_put_i64(w->f, "format_version", STATS_FORMAT_VERSION) < 0 ||
              h5_attr_put_str(w->f, "config", config_text ? config_text : "") < 0;
    hid_t s = ds_create(w->f, "step", H5T_STD_I64LE, 1, "optimizer steps completed at each row");
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
        hid_t ds = ds_create(grp, "rows", L->ftype, 1,
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
    hid_t fapl = latest_fapl(1);
    hbool_t clear = 1; /* what h5clear does: the flags a killed SWMR writer leaves */
    H5Pset(fapl, "clear_status_flags", &clear);
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
    int64_t rows = ds_rows(w->step);
    for (int l = 0; l < w->n; l++) {
        int64_t r = ds_rows(w->L[l].ds);
        if (r < rows) rows = r;
    }
    int64_t *steps = xcalloc((size_t)(rows > 0 ? rows : 1), sizeof(int64_t));
    if (ds_read_rows(w->step, rows, 1, H5T_NATIVE_INT64, steps) < 0) {
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
    quiet_hdf5();
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

int stats_writer_append(stats_writer *w, int64_t step, const stats_row *rows) {
    hsize_t r = (hsize_t)w->rows;
    for (int l = 0; l < w->n; l++) {
        wlayer *L = &w->L[l];
        const stats_row *x = &rows[l];
        if (!x->tokens || (L->d.z_bins > 0 && !x->z_hist) || (L->d.sigma_bins > 0 && !x->sigma_hist))
            return -1;
        derived dv = derive(x->tokens, L->d.n_buckets);
        int64_t iv[D_FIXED] = {0};
        double fv[D_FIXED] = {0};
        iv[D_N_TOKENS] = x->n_tokens;
        iv[D_DROPPED] = x->dropped;
        iv[D_UNUSED] = dv.unused;
        fv[D_DROPPED_FRAC] = x->assignments > 0 ? (double)x->dropped / (double)x->assignments : 0.0;
        fv[D_GATE_ENT] = x->gate_entropy;
        fv[D_ROUTER_ENT] = x->router_entropy;
        fv[D_CONFIDENCE] = x->top_gate;
        fv[D_CV] = dv.cv;
        fv[D_MAX_MEAN] = dv.max_over_mean;
        fv[D_TOP20] = dv.top20;
        fv[D_BOTTOM20] = dv.bottom20;
        fv[D_T_ROUTE] = x->t_route;
        fv[D_T_DISPATCH] = x->t_dispatch;
        fv[D_T_ALLTOALL] = x->t_alltoall;
        fv[D_T_EXPERT] = x->t_expert;
        fv[D_SIGMA] = x->mean_sigma;
        fv[D_OVERLAP] = x->mask_overlap;
        fv[D_ACTIVE] = x->active_units;
        memcpy(L->rec, x->tokens, 8 * (size_t)L->d.n_buckets);
        for (int s = 1; s < D_FIXED; s++)
            memcpy(L->rec + L->off_col + 8 * (size_t)(s - 1), SERIES[s].is_int ? (void *)&iv[s] : (void *)&fv[s], 8);
        for (int a = 0; a < L->d.n_aux; a++)
            memcpy(L->rec + L->off_col + 8 * (size_t)(D_FIXED - 1 + a), &x->aux[a], 8);
        if (L->d.z_bins > 0) memcpy(L->rec + L->off_z, x->z_hist, 8 * (size_t)L->d.z_bins);
        if (L->d.sigma_bins > 0) memcpy(L->rec + L->off_sigma, x->sigma_hist, 8 * (size_t)L->d.sigma_bins);
        if (ds_append(L->ds, r, 1, L->mtype, L->rec) < 0) return -1;
    }
    /* /step last: a reader takes the rows every dataset has */
    if (ds_append(w->step, r, 1, H5T_NATIVE_INT64, &step) < 0) return -1;
    if (H5Fflush(w->f, H5F_SCOPE_LOCAL) < 0) return -1;
    w->rows++;
    return 0;
}

int64_t stats_writer_rows(const stats_writer *w) { return w->rows; }

void stats_writer_close(stats_writer *w) { writer_free(w); }

/* ======================================================================
 * The trainer's side
 * ====================================================================== */

struct stats_run {
    stats_writer *w;  /* rank 0, while writing works */
    int rank, n;
    int *layer;       /* model layer of each stats layer */
    double *prev;     /* (n, 4) cumulative timers at the previous row (this rank) */
    int64_t prev_step;
    MPI_Comm world;
    stats_row *rows;
    int64_t appended;
    double t_append;  /* seconds inside stats_append (this rank) */
    char path[1200];
};

static const char *const MOE_AUX[] = {"importance", "load", "switch", "z", "moge"};

/*
 * The layers that have statistics and how they are described: discrete MoE
 * (experts as buckets, five aux losses) and ∞-MoE (unit blocks as buckets, the
 * tokens using each block; the KL loss; a histogram of the sampled z mod 1 with
 * the window rule; a histogram of sigma).
 */
static int describe_layers(const gpt_model *m, const run_config *cfg, stats_layer_desc *desc,
                           int *layer) {
    int n = 0;
    for (int l = 0; l < m->L; l++) {
        if (!m->ffn[l].moe && !m->ffn[l].inf) continue;
        stats_layer_desc *d = &desc[n];
        memset(d, 0, sizeof *d);
        d->layer = l;
        d->kind = layer_kind_name(cfg->ffn_kind);
        if (m->ffn[l].moe) {
            d->bucket = "expert";
            d->n_buckets = moe_num_experts(m->ffn[l].moe);
            d->k = cfg->top_k;
            d->n_aux = 5;
            for (int a = 0; a < 5; a++) d->aux_names[a] = MOE_AUX[a];
        } else {
            const inf_stats *st = inf_get_stats(m->ffn[l].inf);
            d->bucket = "block";
            d->n_buckets = st->n_blocks;
            d->n_aux = 1;
            d->aux_names[0] = "kl";
            if (cfg->mask == MASK_WINDOW) {
                d->z_bins = st->n_bins;
                d->z_lo = 0.0;
                d->z_hi = 1.0;
            }
            d->sigma_bins = st->n_sigma_bins;
            d->sigma_lo = 0.0;
            d->sigma_hi = st->sigma_hi;
        }
        layer[n++] = l;
    }
    return n;
}

/* Cumulative phase timers of layer l. ∞-MoE: routing is the router MLP, sampling,
 * the masks (owner and shards) and packing rows; it has no separate dispatch phase. */
static void timers_of(const gpt_model *m, int l, double t[4]) {
    memset(t, 0, 4 * sizeof(double));
    if (m->ffn[l].inf) {
        const inf_stats *st = inf_get_stats(m->ffn[l].inf);
        t[0] = st->t_router + st->t_masks;
        t[2] = st->t_alltoall;
        t[3] = st->t_units;
        return;
    }
    if (!m->ffn[l].moe) return;
    const moe_stats *st = moe_get_stats(m->ffn[l].moe);
    t[0] = st->t_route;
    t[1] = st->t_dispatch;
    t[2] = st->t_alltoall;
    t[3] = st->t_expert;
}

static void fill_row(const gpt_model *m, int l, const double t[4], stats_row *r) {
    memset(r, 0, sizeof *r);
    r->t_route = t[0];
    r->t_dispatch = t[1];
    r->t_alltoall = t[2];
    r->t_expert = t[3];
    if (m->ffn[l].inf) {
        const inf_stats *st = inf_get_stats(m->ffn[l].inf);
        r->tokens = st->block_tokens;
        r->n_tokens = r->assignments = st->n_tokens;
        r->aux[0] = st->aux_kl;
        r->z_hist = st->z_hist;
        r->sigma_hist = st->sigma_hist;
        r->mean_sigma = st->mean_sigma;
        r->mask_overlap = st->mask_overlap;
        r->active_units = st->active_units;
        return;
    }
    const moe_stats *st = moe_get_stats(m->ffn[l].moe);
    r->tokens = st->tokens;
    r->n_tokens = st->n_tokens;
    r->assignments = st->assignments;
    r->dropped = st->dropped;
    r->gate_entropy = st->gate_entropy;
    r->router_entropy = st->router_entropy;
    r->top_gate = st->top_gate;
    r->aux[0] = st->aux_importance;
    r->aux[1] = st->aux_load;
    r->aux[2] = st->aux_switch;
    r->aux[3] = st->aux_z;
    r->aux[4] = st->aux_moge;
}

stats_run *stats_open(const char *dir, const gpt_model *m, const run_config *cfg,
                      const dist_ctx *d, int64_t resume_step) {
    if (cfg->stats_every <= 0 || m->n_moe + m->n_inf == 0) return NULL;
    stats_run *s = xcalloc(1, sizeof *s);
    stats_layer_desc *desc = xcalloc((size_t)m->L, sizeof *desc);
    s->layer = xcalloc((size_t)m->L, sizeof(int));
    s->n = describe_layers(m, cfg, desc, s->layer);
    s->rank = d->rank;
    s->world = d->world;
    s->prev = xcalloc((size_t)s->n * 4, sizeof(double));
    s->rows = xcalloc((size_t)s->n, sizeof(stats_row));
    s->prev_step = resume_step > 0 ? resume_step : 0;
    for (int i = 0; i < s->n; i++) timers_of(m, s->layer[i], s->prev + 4 * i);
    snprintf(s->path, sizeof s->path, "%s/stats.h5", dir);
    if (d->rank == 0) {
        char err[1500] = "";
        s->w = stats_writer_open(s->path, desc, s->n, resume_step, cfg->text, err, sizeof err);
        if (!s->w && resume_step >= 0) { /* unreadable or another layout: keep it aside, start anew */
            char old[1300];
            snprintf(old, sizeof old, "%s.old", s->path);
            if (rename(s->path, old) == 0) {
                dist_log("stats: %s; moved it to %s and starting a new file\n", err, old);
                s->w = stats_writer_open(s->path, desc, s->n, -1, cfg->text, err, sizeof err);
            }
        }
        if (!s->w) dist_log("stats: %s; routing statistics are off for this run\n", err);
        else if (resume_step > 0)
            dist_log("stats: %s: %lld rows up to step %lld kept, appending\n", s->path,
                     (long long)stats_writer_rows(s->w), (long long)resume_step);
    }
    free(desc);
    return s;
}

void stats_append(stats_run *s, const gpt_model *m, int64_t step) {
    if (!s) return;
    double t0 = wall_time();
    double *t = xmalloc(sizeof(double) * (size_t)s->n * 4);
    double steps = step > s->prev_step ? (double)(step - s->prev_step) : 1.0;
    for (int i = 0; i < s->n; i++) {
        double cur[4];
        timers_of(m, s->layer[i], cur);
        for (int j = 0; j < 4; j++) {
            t[4 * i + j] = (cur[j] - s->prev[4 * i + j]) / steps;
            s->prev[4 * i + j] = cur[j];
        }
    }
    s->prev_step = step;
    dist_allreduce_max_d(t, s->n * 4, s->world);
    if (s->rank == 0 && s->w) {
        for (int i = 0; i < s->n; i++) fill_row(m, s->layer[i], t + 4 * i, &s->rows[i]);
        if (stats_writer_append(s->w, step, s->rows) < 0) {
            dist_log("stats: cannot append to %s at step %lld; routing statistics are off from here\n",
                     s->path, (long long)step);
            stats_writer_close(s->w);
            s->w = NULL;
        }
    }
    free(t);
    s->appended++;
    s->t_append += wall_time() - t0;
}

void stats_close(stats_run *s) {
    if (!s) return;
    if (s->w) {
        dist_log("stats: %s | %lld rows, %lld this run | %.3f ms per row\n", s->path,
                 (long long)stats_writer_rows(s->w), (long long)s->appended,
                 s->appended ? 1e3 * s->t_append / (double)s->appended : 0.0);
        stats_writer_close(s->w);
    }
    free(s->layer);
    free(s->prev);
    free(s->rows);
    free(s);
}

/* ======================================================================
 * Reader: infmoe stats
 * ====================================================================== */

typedef struct {
    char name[32], kind[32], bucket[32];
    int layer, nb, k, n_aux, zb, sb;
    char aux[STATS_MAX_AUX][40];
    int64_t *tokens;                 /* rows x nb */
    double *v[D_FIXED];              /* rows, scalar series (tokens: NULL) */
    double *auxv[STATS_MAX_AUX];
} rlayer;

typedef struct {
    int64_t rows;
    int64_t *step;
    int n;
    rlayer *L;
} rfile;

static void rfile_free(rfile *r) {
    for (int l = 0; l < r->n; l++) {
        free(r->L[l].tokens);
        for (int i = 0; i < D_FIXED; i++) free(r->L[l].v[i]);
        for (int a = 0; a < r->L[l].n_aux; a++) free(r->L[l].auxv[a]);
    }
    free(r->L);
    free(r->step);
    memset(r, 0, sizeof *r);
}

static herr_t collect_name(hid_t g, const char *name, const H5L_info_t *info, void *op) {
    (void)g;
    (void)info;
    rfile *r = op;
    int layer;
    char tail;
    if (sscanf(name, "h.%d%c", &layer, &tail) != 1) return 0;
    r->L = xrealloc(r->L, sizeof(rlayer) * (size_t)(r->n + 1));
    rlayer *L = &r->L[r->n++];
    memset(L, 0, sizeof *L);
    snprintf(L->name, sizeof L->name, "%s", name);
    L->layer = layer;
    return 0;
}

static int cmp_layer(const void *a, const void *b) {
    return ((const rlayer *)a)->layer - ((const rlayer *)b)->layer;
}

enum { RD_OK = 0, RD_MISSING, RD_NOT_HDF5, RD_FOREIGN, RD_BROKEN };

/* Read the whole file. RD_* with a one-line message in err. */
static int rfile_read(const char *path, rfile *r, char *err, size_t cap) {
    memset(r, 0, sizeof *r);
    struct stat st;
    if (stat(path, &st) != 0) {
        snprintf(err, cap, "%s: no such file", path);
        return RD_MISSING;
    }
    if (S_ISDIR(st.st_mode)) {
        snprintf(err, cap, "%s: a directory, not a stats file (try %s/stats.h5)", path, path);
        return RD_NOT_HDF5;
    }
    quiet_hdf5();
    hid_t fapl = latest_fapl(0);
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY | H5F_ACC_SWMR_READ, fapl);
    if (f < 0) f = H5Fopen(path, H5F_ACC_RDONLY, fapl); /* files of older formats */
    H5Pclose(fapl);
    if (f < 0) {
        htri_t is = H5Fis_hdf5(path);
        if (is <= 0)
            snprintf(err, cap, "%s: not an HDF5 file (%lld bytes)", path, (long long)st.st_size);
        else
            snprintf(err, cap, "%s: an HDF5 file that cannot be opened now (a run setting it up?)", path);
        return is <= 0 ? RD_NOT_HDF5 : RD_BROKEN;
    }
    char fmt[64] = "";
    int64_t version = 0;
    if (attr_get_str(f, "format", fmt, sizeof fmt) < 0 || strcmp(fmt, STATS_FORMAT) != 0) {
        snprintf(err, cap, "%s: an HDF5 file but not an infmoe stats file (no format attribute '%s')",
                 path, STATS_FORMAT);
        H5Fclose(f);
        return RD_FOREIGN;
    }
    if (h5_attr_get_i64(f, "format_version", &version) < 0 || version != STATS_FORMAT_VERSION) {
        snprintf(err, cap, "%s: stats format version %lld; this infmoe reads version %d", path,
                 (long long)version, STATS_FORMAT_VERSION);
        H5Fclose(f);
        return RD_FOREIGN;
    }
    int rc = RD_OK;
    hid_t sd = H5Lexists(f, "step", H5P_DEFAULT) > 0 ? H5Dopen2(f, "step", H5P_DEFAULT) : -1;
    hid_t lg = H5Lexists(f, "layers", H5P_DEFAULT) > 0 ? H5Gopen2(f, "layers", H5P_DEFAULT) : -1;
    hid_t *rd = NULL;
    if (sd < 0 || lg < 0) {
        snprintf(err, cap, "%s: damaged stats file (no /step or /layers)", path);
        rc = RD_BROKEN;
        goto done;
    }
    r->rows = ds_rows(sd);
    H5Literate(lg, H5_INDEX_NAME, H5_ITER_INC, NULL, collect_name, r);
    qsort(r->L, (size_t)r->n, sizeof(rlayer), cmp_layer);
    /* shapes, and the rows every dataset holds */
    rd = xcalloc((size_t)(r->n > 0 ? r->n : 1), sizeof(hid_t));
    for (int l = 0; l < r->n; l++) rd[l] = -1;
    for (int l = 0; l < r->n && rc == RD_OK; l++) {
        rlayer *L = &r->L[l];
        hid_t g = H5Gopen2(lg, L->name, H5P_DEFAULT);
        int64_t v = 0;
        if (g >= 0 && h5_attr_get_i64(g, "n_buckets", &v) == 0 && v >= 1 && H5Lexists(g, "rows", H5P_DEFAULT) > 0) {
            L->nb = (int)v;
            L->k = h5_attr_get_i64(g, "k", &v) == 0 ? (int)v : 0;
            if (attr_get_str(g, "kind", L->kind, sizeof L->kind) < 0) snprintf(L->kind, sizeof L->kind, "?");
            if (attr_get_str(g, "bucket", L->bucket, sizeof L->bucket) < 0)
                snprintf(L->bucket, sizeof L->bucket, "expert");
            rd[l] = H5Dopen2(g, "rows", H5P_DEFAULT);
        }
        if (g >= 0) H5Gclose(g);
        if (rd[l] < 0) {
            snprintf(err, cap, "%s: damaged stats file (layer %s)", path, L->name);
            rc = RD_BROKEN;
            break;
        }
        int64_t a = ds_rows(rd[l]);
        if (a < r->rows) r->rows = a;
    }
    if (rc != RD_OK) goto done;
    int64_t n = r->rows, n1 = n > 0 ? n : 1;
    r->step = xcalloc((size_t)n1, sizeof(int64_t));
    if (ds_read_rows(sd, n, 1, H5T_NATIVE_INT64, r->step) < 0) rc = RD_BROKEN;
    for (int l = 0; l < r->n && rc == RD_OK; l++) {
        rlayer *L = &r->L[l];
        /* the record, found by field name: tokens as int64[nb], every scalar as a double */
        hid_t ft = H5Dget_type(rd[l]);
        int nm = H5Tget_class(ft) == H5T_COMPOUND ? H5Tget_nmembers(ft) : 0;
        size_t row_bytes = 8 * (size_t)L->nb + 8 * (size_t)(nm > 0 ? nm : 1);
        hid_t mt = H5Tcreate(H5T_COMPOUND, row_bytes);
        int *slot = xcalloc((size_t)(nm > 0 ? nm : 1), sizeof(int)); /* series, -1 - aux, 0 none */
        int have_tokens = 0;
        for (int c = 0; c < nm; c++) {
            char *name = H5Tget_member_name(ft, (unsigned)c);
            hid_t mtype = H5Tget_member_type(ft, (unsigned)c);
            H5T_class_t cls = H5Tget_class(mtype);
            if (strcmp(name, "tokens") == 0 && cls == H5T_ARRAY && H5Tget_array_ndims(mtype) == 1) {
                hsize_t dim = 0;
                H5Tget_array_dims2(mtype, &dim);
                if ((int)dim == L->nb) {
                    hid_t a = H5Tarray_create2(H5T_NATIVE_INT64, 1, &dim);
                    H5Tinsert(mt, "tokens", 0, a);
                    H5Tclose(a);
                    have_tokens = 1;
                }
            } else if (strcmp(name, "z_hist") == 0) {
                L->zb = 1;
            } else if (strcmp(name, "sigma_hist") == 0) {
                L->sb = 1;
            } else if (cls == H5T_INTEGER || cls == H5T_FLOAT) {
                for (int s2 = 1; s2 < D_FIXED; s2++)
                    if (strcmp(name, SERIES[s2].name) == 0) slot[c] = s2;
                if (!slot[c] && strncmp(name, "aux_", 4) == 0 && L->n_aux < STATS_MAX_AUX) {
                    snprintf(L->aux[L->n_aux], sizeof L->aux[0], "%s", name + 4);
                    slot[c] = -1 - L->n_aux++;
                }
                if (slot[c]) H5Tinsert(mt, name, 8 * (size_t)L->nb + 8 * (size_t)c, H5T_NATIVE_DOUBLE);
            }
            H5Tclose(mtype);
            H5free_memory(name);
        }
        int have_all = have_tokens;
        for (int s2 = 1; s2 < D_FIXED; s2++) {
            int found = 0;
            for (int c = 0; c < nm; c++) found |= slot[c] == s2;
            have_all &= found;
        }
        L->tokens = xcalloc((size_t)(n1 * L->nb), sizeof(int64_t));
        for (int s2 = 1; s2 < D_FIXED; s2++) L->v[s2] = xcalloc((size_t)n1, sizeof(double));
        for (int a = 0; a < L->n_aux; a++) L->auxv[a] = xcalloc((size_t)n1, sizeof(double));
        unsigned char *buf = xcalloc((size_t)n1, row_bytes);
        if (!have_all || ds_read_rows(rd[l], n, 1, mt, buf) < 0) rc = RD_BROKEN;
        for (int64_t i = 0; i < n && rc == RD_OK; i++) {
            const unsigned char *row = buf + (size_t)i * row_bytes;
            memcpy(L->tokens + i * L->nb, row, 8 * (size_t)L->nb);
            for (int c = 0; c < nm; c++) {
                double x;
                memcpy(&x, row + 8 * (size_t)L->nb + 8 * (size_t)c, 8);
                if (slot[c] > 0) L->v[slot[c]][i] = x;
                else if (slot[c] < 0) L->auxv[-1 - slot[c]][i] = x;
            }
        }
        free(buf);
        free(slot);
        H5Tclose(mt);
        H5Tclose(ft);
    }
    if (rc != RD_OK) snprintf(err, cap, "%s: cannot read the rows (damaged or another layout?)", path);
done:
    for (int l = 0; l < r->n && rd; l++)
        if (rd[l] >= 0) H5Dclose(rd[l]);
    free(rd);
    if (lg >= 0) H5Gclose(lg);
    if (sd >= 0) H5Dclose(sd);
    H5Fclose(f);
    if (rc != RD_OK) rfile_free(r);
    return rc;
}

/* ---- options ---- */

typedef struct {
    const char *path;
    int csv, follow;
    int64_t from, to;   /* steps, inclusive */
    int n_layers;       /* 0: all */
    int layers[1024];
    int steps_given;
} stats_opts;

static void stats_usage(FILE *f) {
    fprintf(f,
            "usage: infmoe stats FILE [--layers LIST] [--steps FROM:TO] [--csv] [--follow]\n"
            "\n"
            "Report the routing statistics a training run writes to <output.dir>/stats.h5\n"
            "(train.stats_every; format in docs/stats.md): per MoE layer, the share of\n"
            "tokens per expert as bars, max/mean load and CV at a few steps, unused experts,\n"
            "gate entropy and confidence, dropped tokens and time per phase.\n"
            "\n"
            "options:\n"
            "  --layers LIST     layers to show: 0,3 or h.0,h.3 or 0-2 (default: every MoE layer)\n"
            "  --steps FROM:TO   rows with FROM <= step <= TO (either side may be empty)\n"
            "  --csv             print the rows as CSV (one line per step and layer) instead\n"
            "  --follow          print rows as a running job appends them (the last 10 first,\n"
            "                    or those within --steps); stop with Ctrl-C\n"
            "  --help            this text\n"
            "\n"
            "The file can be read while the job writes it (HDF5 SWMR).\n");
}

static int parse_i64(const char *s, int64_t *out) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end) return -1;
    *out = v;
    return 0;
}

static int parse_layers(const char *list, stats_opts *o) {
    char *copy = xstrdup(list), *save = NULL;
    int rc = 0;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (strncmp(tok, "h.", 2) == 0) tok += 2;
        int a, b;
        char tail;
        if (sscanf(tok, "%d-%d%c", &a, &b, &tail) == 2 && a >= 0 && b >= a) {
        } else if (sscanf(tok, "%d%c", &a, &tail) == 1 && a >= 0) {
            b = a;
        } else {
            rc = -1;
            break;
        }
        for (int x = a; x <= b && o->n_layers < 1024; x++) o->layers[o->n_layers++] = x;
    }
    free(copy);
    return rc;
}

static int parse_steps(const char *s, stats_opts *o) {
    const char *colon = strchr(s, ':');
    if (!colon) return -1;
    char a[64] = "", b[64] = "";
    size_t na = (size_t)(colon - s);
    if (na >= sizeof a || strlen(colon + 1) >= sizeof b) return -1;
    memcpy(a, s, na);
    snprintf(b, sizeof b, "%s", colon + 1);
    o->from = 0;
    o->to = INT64_MAX;
    if (a[0] && parse_i64(a, &o->from) < 0) return -1;
    if (b[0] && parse_i64(b, &o->to) < 0) return -1;
    return o->from <= o->to ? 0 : -1;
}

static int layer_selected(const stats_opts *o, int layer) {
    if (o->n_layers == 0) return 1;
    for (int i = 0; i < o->n_layers; i++)
        if (o->layers[i] == layer) return 1;
    return 0;
}

/* Check --layers against the file: NULL, or the first layer it lacks (message in err). */
static int check_layers(const stats_opts *o, const rfile *r, const char *path, char *err, size_t cap) {
    for (int i = 0; i < o->n_layers; i++) {
        int found = 0;
        for (int l = 0; l < r->n; l++) found |= r->L[l].layer == o->layers[i];
        if (!found) {
            char have[256] = "";
            for (int l = 0; l < r->n; l++)
                snprintf(have + strlen(have), sizeof have - strlen(have), "%s%d", l ? "," : "", r->L[l].layer);
            snprintf(err, cap, "%s: no MoE layer %d in the file (layers: %s)", path, o->layers[i],
                     r->n ? have : "none");
            return -1;
        }
    }
    return 0;
}

/* ---- report ---- */

static void print_layer_report(const rlayer *L, const rfile *r, int64_t i0, int64_t i1) {
    int64_t n = i1 - i0; /* rows [i0, i1) */
    char k[32] = "";
    if (L->k > 0) snprintf(k, sizeof k, ", k %d", L->k);
    printf("\nlayer %s | %s, %d %ss%s | %lld rows, steps %lld..%lld\n", L->name, L->kind, L->nb,
           L->bucket, k, (long long)n, (long long)r->step[i0], (long long)r->step[i1 - 1]);
    /* usage: share of kept assignments over the selected rows, as bars */
    double *sum = xcalloc((size_t)L->nb, sizeof(double));
    double total = 0.0;
    for (int64_t i = i0; i < i1; i++)
        for (int b = 0; b < L->nb; b++) sum[b] += (double)L->tokens[i * L->nb + b];
    for (int b = 0; b < L->nb; b++) total += sum[b];
    int groups = L->nb <= 32 ? L->nb : 32, per = (L->nb + groups - 1) / groups;
    groups = (L->nb + per - 1) / per;
    printf("  usage (share of the %s over these rows; | marks the even share)\n",
           L->k > 0 ? "kept assignments" : "tokens counted per bucket");
    double gmax = 0.0;
    for (int g = 0; g < groups; g++) {
        double s = 0.0;
        for (int b = g * per; b < (g + 1) * per && b < L->nb; b++) s += sum[b];
        if (s > gmax) gmax = s;
    }
    const int W = 40;
    for (int g = 0; g < groups; g++) {
        double s = 0.0;
        int b0 = g * per, b1 = (g + 1) * per < L->nb ? (g + 1) * per : L->nb;
        for (int b = b0; b < b1; b++) s += sum[b];
        char label[48];
        if (per == 1) snprintf(label, sizeof label, "%s %d", L->bucket, b0);
        else snprintf(label, sizeof label, "%ss %d-%d", L->bucket, b0, b1 - 1);
        int len = gmax > 0 ? (int)lround(W * s / gmax) : 0;
        int even = gmax > 0 ? (int)lround(W * (total * (b1 - b0) / L->nb) / gmax) : -1;
        char bar[64];
        for (int c = 0; c < W; c++) bar[c] = c < len ? '#' : ' ';
        if (even >= 0 && even < W && even >= len) bar[even] = '|';
        bar[W] = '\0';
        printf("    %-14s %s %5.1f%%%s\n", label, bar, total > 0 ? 100.0 * s / total : 0.0,
               sum[b0] == 0 && per == 1 ? "  (unused)" : "");
    }
    /* imbalance at up to 6 rows spread over the selection */
    int64_t picks[6];
    int np = n < 6 ? (int)n : 6;
    for (int j = 0; j < np; j++) picks[j] = i0 + (np > 1 ? (int64_t)llround((double)j * (n - 1) / (np - 1)) : 0);
    printf("  max/mean  ");
    for (int j = 0; j < np; j++)
        printf("%s step %lld %.3f", j ? " |" : "", (long long)r->step[picks[j]], L->v[D_MAX_MEAN][picks[j]]);
    printf("\n  cv        ");
    for (int j = 0; j < np; j++)
        printf("%s step %lld %.3f", j ? " |" : "", (long long)r->step[picks[j]], L->v[D_CV][picks[j]]);
    /* unused buckets */
    int never = 0;
    for (int b = 0; b < L->nb; b++) never += sum[b] == 0;
    int64_t rows_with = 0;
    for (int64_t i = i0; i < i1; i++) rows_with += L->v[D_UNUSED][i] > 0;
    printf("\n  unused    %d %s%s in the last row; %lld of %lld rows have one or more; %d never used\n",
           (int)L->v[D_UNUSED][i1 - 1], L->bucket, L->v[D_UNUSED][i1 - 1] == 1 ? "" : "s",
           (long long)rows_with, (long long)n, never);
    double m_drop = 0, t[4] = {0}, m_top = 0, m_bot = 0;
    for (int64_t i = i0; i < i1; i++) {
        m_drop += L->v[D_DROPPED_FRAC][i];
        m_top += L->v[D_TOP20][i];
        m_bot += L->v[D_BOTTOM20][i];
        for (int j = 0; j < 4; j++) t[j] += L->v[D_T_ROUTE + j][i];
    }
    if (L->k > 0) { /* routers with gates */
        printf("  entropy   gate %.3f -> %.3f nats (ln k = %.3f) | router %.3f -> %.3f (ln E = %.3f) | "
               "first -> last row",
               L->v[D_GATE_ENT][i0], L->v[D_GATE_ENT][i1 - 1], log((double)L->k), L->v[D_ROUTER_ENT][i0],
               L->v[D_ROUTER_ENT][i1 - 1], log((double)L->nb));
        printf("  confidence %.3f -> %.3f (mean top gate, first -> last row)\n", L->v[D_CONFIDENCE][i0],
               L->v[D_CONFIDENCE][i1 - 1]);
    }
    printf("  top 20%%   of %ss take %.1f%% of the tokens, the bottom 20%% %.1f%% (mean over rows)\n",
           L->bucket, 100.0 * m_top / n, 100.0 * m_bot / n);
    if (strcmp(L->kind, "infinite") == 0)
        printf("  sigma     %.4f -> %.4f | active units %.0f -> %.0f | mask overlap %.3f -> %.3f | "
               "first -> last row",
               L->v[D_SIGMA][i0], L->v[D_SIGMA][i1 - 1], L->v[D_ACTIVE][i0], L->v[D_ACTIVE][i1 - 1],
               L->v[D_OVERLAP][i0], L->v[D_OVERLAP][i1 - 1]);
    else
        printf("  dropped   %.2f%% of assignments (mean)", 100.0 * m_drop / n);
    for (int a = 0; a < L->n_aux; a++) {
        double s = 0;
        for (int64_t i = i0; i < i1; i++) s += L->auxv[a][i];
        if (s != 0.0) printf(" | aux %s %.3g", L->aux[a], s / n);
    }
    printf("\n");
    if (t[0] + t[1] + t[2] + t[3] > 0.0)
        printf("  ms/step   route %.3f | dispatch %.3f | all-to-all %.3f | expert %.3f (mean; max over ranks)\n",
               1e3 * t[0] / n, 1e3 * t[1] / n, 1e3 * t[2] / n, 1e3 * t[3] / n);
    free(sum);
}

/* Rows [i0, i1) of the file within --steps. */
static void select_rows(const rfile *r, const stats_opts *o, int64_t *i0, int64_t *i1) {
    *i0 = 0;
    while (*i0 < r->rows && r->step[*i0] < o->from) (*i0)++;
    *i1 = *i0;
    while (*i1 < r->rows && r->step[*i1] <= o->to) (*i1)++;
}

static void csv_header(const rfile *r, const stats_opts *o) {
    int nb = 0;
    const rlayer *first = NULL;
    for (int l = 0; l < r->n; l++) {
        if (!layer_selected(o, r->L[l].layer)) continue;
        if (!first) first = &r->L[l];
        if (r->L[l].nb > nb) nb = r->L[l].nb;
    }
    printf("step,layer");
    for (int i = 1; i < D_FIXED; i++) printf(",%s", SERIES[i].name);
    if (first)
        for (int a = 0; a < first->n_aux; a++) printf(",aux_%s", first->aux[a]);
    for (int b = 0; b < nb; b++) printf(",tokens_%d", b);
    printf("\n");
}

static void csv_row(const rfile *r, const rlayer *L, int64_t i) {
    printf("%lld,%s", (long long)r->step[i], L->name);
    for (int s = 1; s < D_FIXED; s++) {
        if (SERIES[s].is_int) printf(",%lld", (long long)L->v[s][i]);
        else printf(",%.9g", L->v[s][i]);
    }
    for (int a = 0; a < L->n_aux; a++) printf(",%.9g", L->auxv[a][i]);
    for (int b = 0; b < L->nb; b++) printf(",%lld", (long long)L->tokens[i * L->nb + b]);
    printf("\n");
}

static void follow_row(const rfile *r, const rlayer *L, int64_t i) {
    printf("step %lld %s | max/mean %.3f | cv %.3f | unused %lld | entropy %.3f | confidence %.3f | "
           "dropped %.2f%% | tokens",
           (long long)r->step[i], L->name, L->v[D_MAX_MEAN][i], L->v[D_CV][i],
           (long long)L->v[D_UNUSED][i], L->v[D_GATE_ENT][i], L->v[D_CONFIDENCE][i],
           100.0 * L->v[D_DROPPED_FRAC][i]);
    for (int b = 0; b < L->nb; b++) printf(" %lld", (long long)L->tokens[i * L->nb + b]);
    printf("\n");
}

static void print_rows(const rfile *r, const stats_opts *o, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++)
        for (int l = 0; l < r->n; l++) {
            if (!layer_selected(o, r->L[l].layer)) continue;
            if (o->csv) csv_row(r, &r->L[l], i);
            else follow_row(r, &r->L[l], i);
        }
}

static int follow(const stats_opts *o) {
    int64_t last = -1; /* the last step printed */
    int started = 0, header = 0;
    char err[1500];
    for (;;) {
        rfile r;
        int rc = rfile_read(o->path, &r, err, sizeof err);
        if (rc == RD_FOREIGN) { /* waiting will not help */
            fprintf(stderr, "infmoe stats: %s\n", err);
            return 1;
        }
        if (rc == RD_OK) {
            if (!started && o->n_layers > 0 && check_layers(o, &r, o->path, err, sizeof err) < 0) {
                fprintf(stderr, "infmoe stats: %s\n", err);
                rfile_free(&r);
                return 1;
            }
            int64_t i0, i1;
            select_rows(&r, o, &i0, &i1);
            if (o->csv && !header) {
                csv_header(&r, o);
                header = 1;
            }
            if (!started) {
                if (!o->steps_given && i1 - i0 > 10) i0 = i1 - 10;
                started = 1;
            } else {
                if (r.rows > 0 && r.step[r.rows - 1] < last) { /* a resumed run dropped rows */
                    if (!o->csv)
                        printf("(rows after step %lld were dropped by a resumed run)\n",
                               (long long)r.step[r.rows - 1]);
                    last = r.step[r.rows - 1];
                }
                while (i0 < i1 && r.step[i0] <= last) i0++;
            }
            print_rows(&r, o, i0, i1);
            if (i1 > i0) last = r.step[i1 - 1];
            fflush(stdout);
            int done = r.rows > 0 && r.step[r.rows - 1] >= o->to;
            rfile_free(&r);
            if (done) return 0;
        }
        struct timespec ts = {1, 0};
        nanosleep(&ts, NULL);
    }
}

int stats_main(int argc, char **argv) {
    stats_opts o;
    memset(&o, 0, sizeof o);
    o.from = 0;
    o.to = INT64_MAX;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            stats_usage(stdout);
            return 0;
        } else if (strcmp(a, "--csv") == 0) {
            o.csv = 1;
        } else if (strcmp(a, "--follow") == 0) {
            o.follow = 1;
        } else if (strcmp(a, "--layers") == 0 || strcmp(a, "--steps") == 0) {
            if (i + 1 >= argc) {
                fprintf(stderr, "infmoe stats: %s needs a value (see infmoe stats --help)\n", a);
                return 1;
            }
            const char *v = argv[++i];
            if (a[2] == 'l' && parse_layers(v, &o) < 0) {
                fprintf(stderr, "infmoe stats: --layers %s: expected layers like 0,3 or h.0,h.3 or 0-2\n", v);
                return 1;
            }
            if (a[2] == 's') {
                if (parse_steps(v, &o) < 0) {
                    fprintf(stderr, "infmoe stats: --steps %s: expected FROM:TO (e.g. 100:500, 100:, :500)\n", v);
                    return 1;
                }
                o.steps_given = 1;
            }
        } else if (a[0] == '-') {
            fprintf(stderr, "infmoe stats: unknown option '%s' (see infmoe stats --help)\n", a);
            return 1;
        } else if (!o.path) {
            o.path = a;
        } else {
            fprintf(stderr, "infmoe stats: more than one file given ('%s' and '%s')\n", o.path, a);
            return 1;
        }
    }
    if (!o.path) {
        fprintf(stderr, "infmoe stats: no file given (usage: infmoe stats FILE; see --help)\n");
        return 1;
    }
    if (o.follow) return follow(&o);

    rfile r;
    char err[1500];
    if (rfile_read(o.path, &r, err, sizeof err) != RD_OK) {
        fprintf(stderr, "infmoe stats: %s\n", err);
        return 1;
    }
    int rc = 0;
    int64_t i0, i1;
    select_rows(&r, &o, &i0, &i1);
    if (r.n == 0) {
        fprintf(stderr, "infmoe stats: %s: no MoE layers in the file\n", o.path);
        rc = 1;
    } else if (r.rows == 0) {
        fprintf(stderr, "infmoe stats: %s: no rows yet (the run has not completed train.stats_every steps)\n",
                o.path);
        rc = 1;
    } else if (check_layers(&o, &r, o.path, err, sizeof err) < 0) {
        fprintf(stderr, "infmoe stats: %s\n", err);
        rc = 1;
    } else if (i1 == i0) {
        fprintf(stderr, "infmoe stats: %s: no rows within --steps (the file has steps %lld..%lld)\n",
                o.path, (long long)r.step[0], (long long)r.step[r.rows - 1]);
        rc = 1;
    } else if (o.csv) {
        csv_header(&r, &o);
        print_rows(&r, &o, i0, i1);
    } else {
        int64_t every = r.rows > 1 ? r.step[1] - r.step[0] : 0;
        printf("%s: %lld rows, steps %lld..%lld", o.path, (long long)r.rows, (long long)r.step[0],
               (long long)r.step[r.rows - 1]);
        if (every > 0) printf(" (every %lld)", (long long)every);
        printf(", %d MoE layers; showing steps %lld..%lld\n", r.n, (long long)r.step[i0],
               (long long)r.step[i1 - 1]);
        for (int l = 0; l < r.n; l++)
            if (layer_selected(&o, r.L[l].layer)) print_layer_report(&r.L[l], &r, i0, i1);
    }
    rfile_free(&r);
    return rc;
}
