/* statsreport: `infmoe stats`, the report of a stats.h5 file (see statsreport.h, docs/stats.md). */
#define _POSIX_C_SOURCE 200809L
#include "infmoe/statsreport.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "infmoe/statsfile.h"
#include "infmoe/util.h"

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
            "tokens per expert as bars, max/mean and min/mean load and CV at a few steps, unused experts,\n"
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

/* One layer number of --layers: a whole integer below model.n_layer's limit. */
static int parse_layer(const char *s, int *out) {
    int64_t v;
    char err[128];
    if (parse_int_arg("--layers", s, 0, 1023, &v, err, sizeof err) < 0) return -1;
    *out = (int)v;
    return 0;
}

static int parse_layers(const char *list, stats_opts *o) {
    char *copy = xstrdup(list), *save = NULL;
    int rc = 0;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (strncmp(tok, "h.", 2) == 0) tok += 2;
        int a, b;
        char *dash = strchr(tok, '-');
        if (dash) *dash = '\0';
        if (parse_layer(tok, &a) < 0) {
            rc = -1;
            break;
        }
        b = a;
        if (dash && (parse_layer(dash + 1, &b) < 0 || b < a)) {
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
    char err[192];
    if (a[0] && parse_int_arg("--steps", a, 0, INT64_MAX, &o->from, err, sizeof err) < 0) return -1;
    if (b[0] && parse_int_arg("--steps", b, 0, INT64_MAX, &o->to, err, sizeof err) < 0) return -1;
    return o->from <= o->to ? 0 : -1;
}

static int layer_selected(const stats_opts *o, int layer) {
    if (o->n_layers == 0) return 1;
    for (int i = 0; i < o->n_layers; i++)
        if (o->layers[i] == layer) return 1;
    return 0;
}

/* Check --layers against the file: NULL, or the first layer it lacks (message in err). */
static int check_layers(const stats_opts *o, const stats_data *r, const char *path, char *err, size_t cap) {
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

static void print_layer_report(const stats_layer_data *L, const stats_data *r, int64_t i0, int64_t i1) {
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
        printf("%s step %lld %.3f", j ? " |" : "", (long long)r->step[picks[j]], L->v[STATS_COL_MAX_MEAN][picks[j]]);
    printf("\n  min/mean  "); /* the least used bucket (∞-MoE: ring balance) */
    for (int j = 0; j < np; j++) {
        const int64_t *t = L->tokens + picks[j] * L->nb;
        double lo = (double)t[0], mean = 0.0;
        for (int b = 0; b < L->nb; b++) {
            mean += (double)t[b] / L->nb;
            if ((double)t[b] < lo) lo = (double)t[b];
        }
        printf("%s step %lld %.3f", j ? " |" : "", (long long)r->step[picks[j]], mean > 0 ? lo / mean : 0.0);
    }
    printf("\n  cv        ");
    for (int j = 0; j < np; j++)
        printf("%s step %lld %.3f", j ? " |" : "", (long long)r->step[picks[j]], L->v[STATS_COL_CV][picks[j]]);
    if (L->groups > 0) { /* hierarchical MoE: the primary gate's load over its groups */
        printf("\n  groups    %d of %d %ss; group max/mean", L->groups, L->nb / L->groups, L->bucket);
        for (int j = 0; j < np; j++)
            printf("%s step %lld %.3f", j ? " |" : "", (long long)r->step[picks[j]],
                   stats_group_max_over_mean(L->tokens + picks[j] * L->nb, L->nb, L->groups));
    }
    /* unused buckets */
    int never = 0;
    for (int b = 0; b < L->nb; b++) never += sum[b] == 0;
    int64_t rows_with = 0;
    for (int64_t i = i0; i < i1; i++) rows_with += L->v[STATS_COL_UNUSED][i] > 0;
    printf("\n  unused    %d %s%s in the last row; %lld of %lld rows have one or more; %d never used\n",
           (int)L->v[STATS_COL_UNUSED][i1 - 1], L->bucket, L->v[STATS_COL_UNUSED][i1 - 1] == 1 ? "" : "s",
           (long long)rows_with, (long long)n, never);
    double m_drop = 0, t[4] = {0}, m_top = 0, m_bot = 0;
    for (int64_t i = i0; i < i1; i++) {
        m_drop += L->v[STATS_COL_DROPPED_FRAC][i];
        m_top += L->v[STATS_COL_TOP20][i];
        m_bot += L->v[STATS_COL_BOTTOM20][i];
        for (int j = 0; j < 4; j++) t[j] += L->v[STATS_COL_T_ROUTE + j][i];
    }
    if (L->k > 0) { /* routers with gates */
        printf("  entropy   gate %.3f -> %.3f nats (ln k = %.3f) | router %.3f -> %.3f (ln E = %.3f) | "
               "first -> last row\n",
               L->v[STATS_COL_GATE_ENT][i0], L->v[STATS_COL_GATE_ENT][i1 - 1], log((double)L->k), L->v[STATS_COL_ROUTER_ENT][i0],
               L->v[STATS_COL_ROUTER_ENT][i1 - 1], log((double)L->nb));
        printf("  confidence %.3f -> %.3f (mean top gate, first -> last row)\n", L->v[STATS_COL_CONFIDENCE][i0],
               L->v[STATS_COL_CONFIDENCE][i1 - 1]);
    }
    printf("  top 20%%   of %ss take %.1f%% of the tokens, the bottom 20%% %.1f%% (mean over rows)\n",
           L->bucket, 100.0 * m_top / n, 100.0 * m_bot / n);
    if (L->shared) /* a shared FFN beside the routed ones */
        printf("  shared    %.1f%% -> %.1f%% of the FFN output (norm share of the shared FFN, first -> last row)\n",
               100.0 * L->shared[i0], 100.0 * L->shared[i1 - 1]);
    if (L->bias) { /* aux-loss-free balancing */
        const double *b = L->bias + (i1 - 1) * L->nb;
        double lo = b[0], hi = b[0];
        for (int e = 1; e < L->nb; e++) {
            lo = b[e] < lo ? b[e] : lo;
            hi = b[e] > hi ? b[e] : hi;
        }
        printf("  bias      %+.4f .. %+.4f in the last row", lo, hi);
        if (L->nb <= 16) {
            printf(":");
            for (int e = 0; e < L->nb; e++) printf(" %+.4f", b[e]);
        }
        printf("\n");
    }
    if (L->sb) /* layers that sample (∞-MoE) keep a sigma histogram */
        printf("  sigma     %.4f -> %.4f | active units %.0f -> %.0f | mask overlap %.3f -> %.3f | "
               "first -> last row",
               L->v[STATS_COL_SIGMA][i0], L->v[STATS_COL_SIGMA][i1 - 1], L->v[STATS_COL_ACTIVE][i0], L->v[STATS_COL_ACTIVE][i1 - 1],
               L->v[STATS_COL_OVERLAP][i0], L->v[STATS_COL_OVERLAP][i1 - 1]);
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
static void select_rows(const stats_data *r, const stats_opts *o, int64_t *i0, int64_t *i1) {
    *i0 = 0;
    while (*i0 < r->rows && r->step[*i0] < o->from) (*i0)++;
    *i1 = *i0;
    while (*i1 < r->rows && r->step[*i1] <= o->to) (*i1)++;
}

static void csv_header(const stats_data *r, const stats_opts *o) {
    int nb = 0;
    const stats_layer_data *first = NULL;
    for (int l = 0; l < r->n; l++) {
        if (!layer_selected(o, r->L[l].layer)) continue;
        if (!first) first = &r->L[l];
        if (r->L[l].nb > nb) nb = r->L[l].nb;
    }
    printf("step,layer");
    for (int i = 1; i < STATS_N_COLUMNS; i++) printf(",%s", stats_columns[i].name);
    if (first)
        for (int a = 0; a < first->n_aux; a++) printf(",aux_%s", first->aux[a]);
    for (int b = 0; b < nb; b++) printf(",tokens_%d", b);
    if (first && first->shared) printf(",shared_share");
    if (first && first->bias)
        for (int b = 0; b < first->nb; b++) printf(",bias_%d", b);
    printf("\n");
}

static void csv_row(const stats_data *r, const stats_layer_data *L, int64_t i) {
    printf("%lld,%s", (long long)r->step[i], L->name);
    for (int s = 1; s < STATS_N_COLUMNS; s++) {
        if (stats_columns[s].is_int) printf(",%lld", (long long)L->v[s][i]);
        else printf(",%.9g", L->v[s][i]);
    }
    for (int a = 0; a < L->n_aux; a++) printf(",%.9g", L->auxv[a][i]);
    for (int b = 0; b < L->nb; b++) printf(",%lld", (long long)L->tokens[i * L->nb + b]);
    if (L->shared) printf(",%.9g", L->shared[i]);
    if (L->bias)
        for (int b = 0; b < L->nb; b++) printf(",%.9g", L->bias[i * L->nb + b]);
    printf("\n");
}

static void follow_row(const stats_data *r, const stats_layer_data *L, int64_t i) {
    printf("step %lld %s | max/mean %.3f | cv %.3f | unused %lld | entropy %.3f | confidence %.3f | "
           "dropped %.2f%% | tokens",
           (long long)r->step[i], L->name, L->v[STATS_COL_MAX_MEAN][i], L->v[STATS_COL_CV][i],
           (long long)L->v[STATS_COL_UNUSED][i], L->v[STATS_COL_GATE_ENT][i], L->v[STATS_COL_CONFIDENCE][i],
           100.0 * L->v[STATS_COL_DROPPED_FRAC][i]);
    for (int b = 0; b < L->nb; b++) printf(" %lld", (long long)L->tokens[i * L->nb + b]);
    printf("\n");
}

static void print_rows(const stats_data *r, const stats_opts *o, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++)
        for (int l = 0; l < r->n; l++) {
            if (!layer_selected(o, r->L[l].layer)) continue;
            if (o->csv) csv_row(r, &r->L[l], i);
            else follow_row(r, &r->L[l], i);
        }
}

static int follow(const stats_opts *o) {
    int64_t last = -1; /* the last step printed */
    int started = 0, header = 0, unreadable = 0;
    char err[1500];
    for (;;) {
        stats_data r;
        stats_read_status rc = stats_read(o->path, &r, err, sizeof err);
        /* waiting will not help a foreign file, nor one still unreadable a second later: a
         * starting run makes its file readable within a flush */
        unreadable = rc == STATS_READ_NOT_HDF5 || rc == STATS_READ_BROKEN ? unreadable + 1 : 0;
        if (rc == STATS_READ_FOREIGN || unreadable == 2) {
            fprintf(stderr, "infmoe stats: %s\n", err);
            return 1;
        }
        if (rc == STATS_READ_OK) {
            if (!started && o->n_layers > 0 && check_layers(o, &r, o->path, err, sizeof err) < 0) {
                fprintf(stderr, "infmoe stats: %s\n", err);
                stats_data_free(&r);
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
            stats_data_free(&r);
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

    stats_data r;
    char err[1500];
    if (stats_read(o.path, &r, err, sizeof err) != STATS_READ_OK) {
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
    stats_data_free(&r);
    return rc;
}
