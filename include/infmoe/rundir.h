/*
 * rundir: the run directory (output.dir), written without following links.
 *
 * Rank 0 opens output.dir once and creates, renames and removes everything it
 * writes there relative to that descriptor (openat, mkdirat, renameat,
 * unlinkat; O_NOFOLLOW and O_EXCL where a file is created), so nothing outside
 * the directory is touched through a link. (HDF5 opens model.h5 and stats.h5 by
 * path: model.h5's directory is checked before it is published.) What infmoe writes there (step_NNNNNN and
 * step_NNNNNN.tmp directories, latest, config.yaml, train.log, stats.h5, .lock
 * and their .tmp names) must be what infmoe would have put there: a symbolic link, or a
 * file where a directory belongs (or the reverse), is refused with one line
 * naming it, and is never removed. output.dir itself may be a link (to scratch
 * space, say); the links that are refused are those inside it.
 *
 * The run holds an advisory lock on output.dir/.lock (flock) from the start to
 * the end, so a second run on the same directory stops at once; the kernel
 * drops the lock when the process ends, however it ends.
 *
 * Rank-0 functions return 0, or -1 with one line for the user in err (the path
 * and strerror(errno)); callers pass err to dist_exit_if_error so that every
 * rank leaves together.
 */
#ifndef INFMOE_RUNDIR_H
#define INFMOE_RUNDIR_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "infmoe/dist.h"

typedef struct {
    char path[1024]; /* output.dir as given: messages and the paths HDF5 opens */
    int fd;          /* rank 0: the directory, opened once; -1 on other ranks */
    int lock_fd;     /* rank 0: .lock, flock'd for the run; -1 on other ranks */
} run_dir;

/*
 * Collective. Rank 0 creates output.dir (mkdir -p), opens it, takes the lock
 * and checks the names infmoe writes there; on failure (the directory in use by
 * another run, a link where a checkpoint goes, no space, no permission) rank 0
 * prints one line and every rank exits with status 1.
 */
void rundir_open(run_dir *r, const char *path, const dist_ctx *d);
/* Release the lock and the directory (rank 0; a no-op elsewhere). */
void rundir_close(run_dir *r);

/* Refuse `name` when it is a link, or exists and is not a directory (want_dir) or a regular file. */
int rundir_check(const run_dir *r, const char *name, int want_dir, char *err, size_t cap);
/* Remove `name` (a directory with all it holds, or a file) if it exists; links inside
 * a directory are unlinked, never followed; `name` itself must pass rundir_check. */
int rundir_remove(const run_dir *r, const char *name, int want_dir, char *err, size_t cap);
/* Create directory `name` (which must not exist) and make sure path/name leads to it. */
int rundir_mkdir(const run_dir *r, const char *name, char *err, size_t cap);
/*
 * Before publishing directory `name`: it is still the real directory path/name
 * leads to, and `file` in it (written by path, by HDF5) is a regular file with
 * one link.
 */
int rundir_check_written(const run_dir *r, const char *name, const char *file, char *err, size_t cap);
/*
 * Directory `from` becomes `to`. An existing `to` (an older save of the same
 * step) is swapped out atomically (renameat2 RENAME_EXCHANGE) and then removed,
 * so `to` exists at every moment; where the file system cannot exchange, it is
 * removed first.
 */
int rundir_publish_dir(const run_dir *r, const char *from, const char *to, char *err, size_t cap);
/* Rename `from` to `to` (renameat: a file replaces the file of that name) and sync the run directory. */
int rundir_rename(const run_dir *r, const char *from, const char *to, char *err, size_t cap);
/*
 * Check that `bytes` fit in directory `name` (quota and free space), by
 * allocating them to a file there and removing it again; file systems that
 * cannot preallocate pass.
 */
int rundir_reserve(const run_dir *r, const char *name, uint64_t bytes, char *err, size_t cap);
/* fsync `name` in the run directory (NULL: the directory itself); failures are ignored. */
void rundir_sync(const run_dir *r, const char *name);

/*
 * Replace file `name` without ever truncating it: `text` goes to name.tmp
 * (created fresh), is synced, and is renamed over name. On failure name.tmp is
 * removed and name is as it was.
 */
int rundir_replace(const run_dir *r, const char *name, const char *text, char *err, size_t cap);
/* `name` opened for appending (created if missing); NULL with err on failure. */
FILE *rundir_append(const run_dir *r, const char *name, char *err, size_t cap);

/*
 * The complete checkpoints (real directories named step_NNNNNN) in directory
 * dirfd, ascending; returns the count, steps malloc'd (NULL when none).
 */
int rundir_steps(int dirfd, int64_t **steps);

/*
 * What <dir>/latest names (any rank; read without following links): 1 with the
 * step_NNNNNN name in `name`; 0 when there is no latest; -1 with the reason in
 * `name` when it cannot be read or does not name a checkpoint directory.
 */
int rundir_latest(int dirfd, char *name, size_t cap);

#endif
