/* stats: routing statistics from the trainer into stats.h5 (see stats.h, docs/stats.md). */
#include "infmoe/stats.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/ffn.h"
#include "infmoe/statsfile.h"
#include "infmoe/util.h"

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

stats_run *stats_open(const char *dir, const gpt_model *m, const run_config *cfg,
                      const dist_ctx *d, int64_t resume_step) {
    if (cfg->stats_every <= 0) return NULL;
    stats_layer_desc *desc = xcalloc((size_t)m->L, sizeof *desc);
    int *layer = xcalloc((size_t)m->L, sizeof(int)), n = 0;
    for (int l = 0; l < m->L; l++)
        if (ffn_stats_describe(&m->ffn[l], &desc[n])) layer[n++] = l;
    if (n == 0) {
        free(desc);
        free(layer);
        return NULL;
    }
    stats_run *s = xcalloc(1, sizeof *s);
    s->layer = layer;
    s->n = n;
    s->rank = d->rank;
    s->world = d->world;
    s->prev = xcalloc((size_t)s->n * 4, sizeof(double));
    s->rows = xcalloc((size_t)s->n, sizeof(stats_row));
    s->prev_step = resume_step > 0 ? resume_step : 0;
    for (int i = 0; i < s->n; i++) ffn_phase_times(&m->ffn[s->layer[i]], s->prev + 4 * i);
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
        ffn_phase_times(&m->ffn[s->layer[i]], cur);
        for (int j = 0; j < 4; j++) {
            t[4 * i + j] = (cur[j] - s->prev[4 * i + j]) / steps;
            s->prev[4 * i + j] = cur[j];
        }
    }
    s->prev_step = step;
    dist_allreduce_max_d(t, s->n * 4, s->world);
    if (s->rank == 0 && s->w) {
        for (int i = 0; i < s->n; i++) {
            stats_row *r = &s->rows[i];
            ffn_stats_row(&m->ffn[s->layer[i]], r);
            r->t_route = t[4 * i];
            r->t_dispatch = t[4 * i + 1];
            r->t_alltoall = t[4 * i + 2];
            r->t_expert = t[4 * i + 3];
        }
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
