/*
 * stats: the trainer's side of the routing statistics (<output.dir>/stats.h5;
 * the file itself is statsfile.h, the report statsreport.h; docs/stats.md).
 *
 * Every train.stats_every steps, after the step's update, every rank calls
 * stats_append: the per-layer phase timers are reduced (max over ranks) and
 * rank 0 appends one row per layer that has statistics (what ffn_stats_row
 * gives: counters the layers have already reduced over all ranks) and flushes.
 * A resumed run reopens the file and drops the rows after the checkpoint's step
 * before appending, so /step has no gap and no duplicate.
 */
#ifndef INFMOE_STATS_H
#define INFMOE_STATS_H

#include <stdint.h>

#include "infmoe/config.h"
#include "infmoe/dist.h"
#include "infmoe/model.h"

/*
 * Collective: every rank calls each. stats_open returns NULL when
 * cfg->stats_every is 0 or no layer of the model has statistics. resume_step as
 * for stats_writer_open. A file that cannot be written turns the statistics off
 * with one log line; training goes on.
 */
typedef struct stats_run stats_run;
stats_run *stats_open(const char *dir, const gpt_model *m, const run_config *cfg,
                      const dist_ctx *d, int64_t resume_step);
/* One row per layer with statistics for `step` (optimizer steps completed). */
void stats_append(stats_run *s, const gpt_model *m, int64_t step);
void stats_close(stats_run *s);

#endif
