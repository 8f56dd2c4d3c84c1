/*
 * ckpt: HDF5 checkpoints that survive crashes and resume on any layout.
 *
 * <run dir>/step_NNNNNN/model.h5, one file written by all ranks with MPI-IO:
 *   /params/<tensor>, /adam_m/<tensor>, /adam_v/<tensor>   global shapes (experts [E, ...]),
 *       chunked, Fletcher32 checksums; each shard written by its first owner
 *   /state/<layer>.guard_totals                              MoE collapse-guard totals
 *   root attributes: format_version, step, data_position (sequences consumed),
 *       tokens_seen, ranks, ep, seed, config (the YAML text as given),
 *       config_resolved (every key as it ran), rng, metadata_crc32 (of all of them)
 * The directory is written as step_NNNNNN.tmp and renamed when complete, then
 * <run dir>/latest (a one-line file naming it) is replaced atomically, then
 * checkpoints beyond keep_last are removed. Everything in the run directory is
 * created through rundir (never through links). A crash leaves at most a .tmp
 * directory, which resume ignores and the next save of that step replaces.
 * Loading: every rank reads its own hyperslabs, so any rank count and ep can
 * resume any checkpoint. Format: docs/formats.md.
 */
#ifndef INFMOE_CKPT_H
#define INFMOE_CKPT_H

#include <stdint.h>

#include "infmoe/config.h"
#include "infmoe/dist.h"
#include "infmoe/model.h"
#include "infmoe/rundir.h"

/* Version 2 added config_resolved and metadata_crc32; version 1 still loads. */
#define CKPT_FORMAT_VERSION 2
/* Exit status of `infmoe train` after a save requested by SIGTERM or SIGUSR1. */
#define EXIT_SAVED_ON_SIGNAL 75

typedef struct {
    int64_t step;          /* optimizer steps completed */
    int64_t data_position; /* training sequences consumed */
} ckpt_position;

/*
 * Save the model, AdamW state and position as <dir>/step_NNNNNN (collective:
 * every rank calls it) and point latest at it. keep_last (0: all) counts the
 * checkpoints at or below this step; those above it, left by a run this one
 * branched from, are kept. Ends the job without writing when any rank's params,
 * m or v holds a nan or inf. A failure (no space, quota, permission, a link
 * where the checkpoint goes) is one line naming the path; every rank exits
 * with status 1, the partial .tmp removed and latest unchanged.
 */
void ckpt_save(const run_dir *dir, gpt_model *m, const run_config *cfg, const dist_ctx *d,
               ckpt_position pos, int keep_last);

/*
 * Resolve `arg` to a checkpoint directory: "auto" is the one run_dir/latest
 * names (without latest, the newest complete one; returns 0 and leaves path
 * empty when there is none); anything else
 * must be a complete checkpoint directory (or its model.h5). Dies with a
 * message for incomplete (.tmp) or missing checkpoints.
 */
int ckpt_resolve(const char *arg, const char *run_dir, char *path, size_t cap);

/*
 * Load params, AdamW m and v and layer state into m, built from cfg on any
 * layout; returns the position. Ends the job with one line when the metadata
 * fails its checksum or counter checks, an architecture key of cfg differs from
 * the checkpoint's, or a tensor is missing, damaged, of another shape or not finite.
 */
ckpt_position ckpt_load(const char *path, gpt_model *m, const run_config *cfg, const dist_ctx *d);

/*
 * The config a checkpoint was trained with, as YAML text (malloc'd): the
 * resolved config, or for format 1 the text as given. Checks the metadata.
 */
char *ckpt_config_text(const char *path);

/* infmoe ckpt info|verify PATH */
int ckpt_main(int argc, char **argv);

#endif
