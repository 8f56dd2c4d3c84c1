/* ckpt: HDF5 checkpoints: save, resolve, load with resharding, info, verify (see ckpt.h). */
#define _POSIX_C_SOURCE 200809L
#include "infmoe/ckpt.h"

#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "infmoe/ffn.h"
#include "infmoe/h5util.h"
#include "infmoe/rundir.h"
#include "infmoe/util.h"

static const char *const GROUPS[3] = {"params", "adam_m", "adam_v"};
/* State arrays a layer may carry besides its parameters (ffn_state). */
#define CKPT_MAX_STATE 4

static float *model_buffer(gpt_model *m, int g) { return g == 0 ? m->params : g == 1 ? m->m : m->v; }

/* ---- attributes: a failed write is an internal error ---- */

#define ATTR_WRITE(call) h5_check((call) < 0 ? -1 : 0)

/* ---- metadata: the root attributes and their checksum ---- */

/* Integer and text attributes, in the order the metadata checksum covers them. */
static const char *const META_INT[] = {"format_version", "step", "data_position", "tokens_seen",
                                       "ranks", "ep", "seed"};
enum { META_VERSION, META_STEP, META_POSITION, META_TOKENS, META_RANKS, META_EP, META_SEED, N_META_INT };
static const char *const META_TEXT[] = {"config", "config_resolved", "rng"};
enum { META_CONFIG, META_RESOLVED, META_RNG, N_META_TEXT };
#define META_CHECKSUM "metadata_crc32"

typedef struct {
    int64_t v[N_META_INT];
    char *text[N_META_TEXT]; /* malloc'd; config_resolved is NULL in format 1 */
} ckpt_meta;

static void meta_free(ckpt_meta *meta) {
    for (int i = 0; i < N_META_TEXT; i++) free(meta->text[i]);
}

/* CRC-32 of every metadata attribute as "name=value" lines and NUL-ended texts. */
static int64_t meta_checksum(const ckpt_meta *meta) {
    uLong crc = crc32(0L, Z_NULL, 0);
    char line[96];
    for (int i = 0; i < N_META_INT; i++) {
        int n = snprintf(line, sizeof line, "%s=%lld\n", META_INT[i], (long long)meta->v[i]);
        crc = crc32(crc, (const Bytef *)line, (uInt)n);
    }
    for (int i = 0; i < N_META_TEXT; i++) {
        crc = crc32(crc, (const Bytef *)META_TEXT[i], (uInt)strlen(META_TEXT[i]) + 1);
        crc = crc32(crc, (const Bytef *)meta->text[i], (uInt)strlen(meta->text[i]) + 1);
    }
    return (int64_t)crc;
}

/* Why attribute name of f could not be read: absent, or present in damaged metadata. */
static const char *attr_problem(hid_t f, const char *name) {
    return H5Aexists(f, name) == 0 ? "missing attribute" : "unreadable (damaged) attribute";
}

/*
 * Read the metadata of checkpoint file f (path names it in messages) and check
 * its checksum: 0, or -1 with one line in err. Format 1 has neither the
 * resolved config nor a checksum.
 */
static int meta_read(hid_t f, const char *path, ckpt_meta *meta, char *err, size_t cap) {
    memset(meta, 0, sizeof *meta);
    if (h5_attr_get_i64(f, "format_version", &meta->v[META_VERSION]) != 0) {
        int absent = H5Aexists(f, "format_version") == 0;
        snprintf(err, cap, "%s: %s 'format_version': %s", path, attr_problem(f, "format_version"),
                 absent ? "not an infmoe checkpoint" : "the checkpoint's metadata is damaged");
        return -1;
    }
    int64_t version = meta->v[META_VERSION];
    if (version != 1 && version != CKPT_FORMAT_VERSION) {
        snprintf(err, cap, "%s: checkpoint format version %lld, this infmoe reads versions 1 and %d",
                 path, (long long)version, CKPT_FORMAT_VERSION);
        return -1;
    }
    const char *missing = NULL;
    for (int i = 1; i < N_META_INT && !missing; i++)
        if (h5_attr_get_i64(f, META_INT[i], &meta->v[i]) != 0) missing = META_INT[i];
    for (int i = 0; i < N_META_TEXT && !missing; i++)
        if (!(meta->text[i] = h5_attr_get_str(f, META_TEXT[i])) && (version > 1 || i != META_RESOLVED))
            missing = META_TEXT[i];
    int64_t stored = 0;
    if (!missing && version > 1 && h5_attr_get_i64(f, META_CHECKSUM, &stored) != 0) missing = META_CHECKSUM;
    if (missing) {
        snprintf(err, cap, "%s: %s '%s'", path, attr_problem(f, missing), missing);
        meta_free(meta);
        return -1;
    }
    if (version > 1 && stored != meta_checksum(meta)) {
        snprintf(err, cap, "%s: metadata checksum mismatch (stored %08llx, computed %08llx): step, "
                 "data position, seed or config were altered or damaged", path,
                 (unsigned long long)stored, (unsigned long long)meta_checksum(meta));
        meta_free(meta);
        return -1;
    }
    return 0;
}

/* The config a checkpoint was trained with: resolved (format 2), else the text as given. */
static const char *meta_config(const ckpt_meta *meta) {
    return meta->text[META_RESOLVED] ? meta->text[META_RESOLVED] : meta->text[META_CONFIG];
}

/*
 * The counters agree with each other and with the config saved: every step
 * consumes at least one sequence and tokens_seen = data_position x seq_len
 * (step x batch_size holds only while the batch never changed across resumes,
 * so it is not required). 0, or -1 with one line in err.
 */
static int meta_consistent(const ckpt_meta *meta, const run_config *saved, const char *path,
                           char *err, size_t cap) {
    long long step = meta->v[META_STEP], pos = meta->v[META_POSITION], tokens = meta->v[META_TOKENS];
    long long want;
    if (step < 0 || pos < step) {
        snprintf(err, cap, "%.900s: data_position %lld is below step %lld (each step consumes at least "
                 "one sequence)", path, pos, step);
        return -1;
    }
    if (__builtin_mul_overflow(pos, (long long)saved->seq_len, &want) || tokens != want) {
        snprintf(err, cap, "%.900s: tokens_seen %lld is not data_position x model.seq_len (%lld x %d)",
                 path, tokens, pos, saved->seq_len);
        return -1;
    }
    return 0;
}

/* Values in x[0, n) that are nan or inf. */
static size_t count_non_finite(const float *x, size_t n) {
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) bad += !isfinite(x[i]);
    return bad;
}

/* ---- layout of a tensor in the file ---- */

/* Global shape of tensor s (the first dimension of an expert shard is global_dim0). */
static int global_dims(const tensor_spec *s, hsize_t *dims) {
    for (int i = 0; i < s->ndim; i++) dims[i] = (hsize_t)s->shape[i];
    dims[0] = (hsize_t)s->global_dim0;
    return s->ndim;
}

/*
 * A tensor moves one shard block at a time: block i of tensor s is its rows
 * [i block, (i + 1) block) in memory and the rows from shard_first + i stride in
 * the file. Selected as a whole, a strided shard (∞-MoE's units, whose chunks go
 * round the shards) has a file selection of many blocks and a memory selection of
 * one, which HDF5 (1.10) cannot match as shapes: it then maps every element to its
 * chunk one at a time, which made a 2-rank ∞-MoE save and load several times
 * slower than one rank's. A block against a block is the same shape.
 */
static int64_t block_rows(const tensor_spec *s) { /* a shard without gaps is one block */
    return s->shard_stride == s->shard_block ? s->shape[0] : s->shard_block;
}
static int64_t shard_blocks(const tensor_spec *s) { return s->shape[0] / block_rows(s); }

/* Select block i of tensor s in the file space fsp; returns a memory space of the
 * block's rows, and their first float's index in the tensor in *first. */
static hid_t select_block(hid_t fsp, const tensor_spec *s, int64_t i, size_t *first) {
    hsize_t start[4] = {0}, count[4], block[4];
    for (int d = 0; d < s->ndim; d++) count[d] = 1, block[d] = (hsize_t)s->shape[d];
    start[0] = (hsize_t)(s->shard_first + i * s->shard_stride);
    block[0] = (hsize_t)block_rows(s);
    h5_check(H5Sselect_hyperslab(fsp, H5S_SELECT_SET, start, NULL, count, block));
    *first = (size_t)(i * block_rows(s)) * (s->numel / (size_t)s->shape[0]);
    return h5_check(H5Screate_simple(s->ndim, block, NULL));
}

/* Chunks: one shard block per chunk for sharded tensors; about 16 MiB otherwise. */
static void chunk_dims(const tensor_spec *s, const hsize_t *dims, hsize_t *chunk) {
    size_t row = s->numel / (size_t)s->shape[0];
    for (int i = 0; i < s->ndim; i++) chunk[i] = dims[i];
    if (s->sharded) {
        chunk[0] = (hsize_t)s->shard_block;
    } else {
        hsize_t rows = (hsize_t)((4u << 20) / (row ? row : 1));
        if (rows < 1) rows = 1;
        if (rows < chunk[0]) chunk[0] = rows;
    }
}

/* ---- save ---- */

/* A save in progress: its names in the run directory and the file HDF5 writes. */
typedef struct {
    const run_dir *dir;
    const dist_ctx *d;
    char final[32], tmp[40]; /* step_NNNNNN and step_NNNNNN.tmp */
    char file[1200];         /* <output.dir>/step_NNNNNN.tmp/model.h5 */
} ckpt_saving;

/*
 * A call writing the checkpoint file failed although its space was reserved
 * (the disk filled meanwhile, an I/O error): one line naming the file and the
 * cause, the partial step_NNNNNN.tmp removed when rank 0 meets it (latest
 * still names the previous checkpoint), and the job ended with MPI_Abort,
 * since HDF5 leaves the other ranks inside its collective calls. Reads errno
 * first: SAVE_CALL clears it before the call.
 */
static hid_t save_call(const ckpt_saving *s, hid_t rc) {
    int errno_after = errno;
    if (rc >= 0) return rc;
    char removing[1400] = "";
    if (s->d->rank == 0 && rundir_remove(s->dir, s->tmp, 1, removing, sizeof removing) != 0)
        fprintf(stderr, "infmoe: %s\n", removing);
    /* errno is named only when it is a resource error: HDF5 leaves stale values behind */
    int resource = errno_after == ENOSPC || errno_after == EDQUOT || errno_after == EFBIG ||
                   errno_after == EIO || errno_after == EACCES || errno_after == EROFS;
    infmoe_die("cannot write the checkpoint %s: %s", s->file,
               resource ? strerror(errno_after) : "the HDF5 library reported a failure");
}
#define SAVE_CALL(s, call) (errno = 0, save_call((s), (hid_t)(call)))

/*
 * Fault injection for the crash tests: INFMOE_FAULT_SAVE="R:N" makes rank R
 * kill itself with SIGKILL after writing its N-th tensor, counted over all the
 * saves of the run (so N past one save's count lands in a later save).
 */
static void fault_point(const dist_ctx *d) {
    static int rank = -2, after = 0, written = 0;
    written++;
    if (rank == -2) {
        const char *e = getenv("INFMOE_FAULT_SAVE");
        rank = -1;
        if (e && sscanf(e, "%d:%d", &rank, &after) != 2) rank = -1;
    }
    if (rank == d->rank && written == after) raise(SIGKILL);
}

static void write_tensor(const ckpt_saving *save, hid_t group, const tensor_spec *s, const float *buf,
                         hid_t dxpl) {
    const dist_ctx *d = save->d;
    hsize_t dims[4], chunk[4];
    int nd = global_dims(s, dims);
    chunk_dims(s, dims, chunk);
    hid_t fsp = h5_check(H5Screate_simple(nd, dims, NULL));
    hid_t dcpl = h5_check(H5Pcreate(H5P_DATASET_CREATE));
    h5_check(H5Pset_chunk(dcpl, nd, chunk));
    h5_check(H5Pset_fletcher32(dcpl));
    hid_t ds = SAVE_CALL(save, H5Dcreate2(group, s->name, H5T_NATIVE_FLOAT, fsp, H5P_DEFAULT, dcpl, H5P_DEFAULT));
    /* Replicated tensors: rank 0 writes; shards: the first expert group writes. The
     * writes are collective, so every rank makes as many as the rank with the most
     * blocks, selecting nothing in those it has no block for. */
    int writer = s->sharded ? d->edp_rank == 0 : d->rank == 0;
    int64_t nb = shard_blocks(s), calls = nb;
    if (s->sharded) MPI_CHECK(MPI_Allreduce(&nb, &calls, 1, MPI_INT64_T, MPI_MAX, d->world));
    for (int64_t i = 0; i < calls; i++) {
        size_t first = 0;
        hid_t msp;
        if (writer && i < nb) {
            msp = select_block(fsp, s, i, &first);
        } else {
            msp = h5_check(H5Screate_simple(nd, dims, NULL));
            h5_check(H5Sselect_none(fsp));
            h5_check(H5Sselect_none(msp));
        }
        SAVE_CALL(save, H5Dwrite(ds, H5T_NATIVE_FLOAT, msp, fsp, dxpl, buf + s->offset + first));
        H5Sclose(msp);
    }
    H5Dclose(ds);
    H5Pclose(dcpl);
    H5Sclose(fsp);
}

/*
 * Rank 0, once every rank has written: the data on disk, then the rename, then
 * the pointer, then pruning. keep_last counts the checkpoints at or below this
 * step, the line this run continues; any above it were left by a run this one
 * branched from (it resumed an earlier step) and stay until saves replace them.
 * So neither the checkpoint latest names nor this run's own are pruned for them.
 */
static int publish(const ckpt_saving *s, int64_t step, int keep_last, char *err, size_t cap) {
    char name[64], pointer[40];
    snprintf(name, sizeof name, "%s/model.h5", s->tmp);
    rundir_sync(s->dir, name);
    rundir_sync(s->dir, s->tmp);
    snprintf(pointer, sizeof pointer, "%s\n", s->final);
    if (rundir_check_written(s->dir, s->tmp, "model.h5", err, cap) != 0 ||
        rundir_publish_dir(s->dir, s->tmp, s->final, err, cap) != 0 ||
        rundir_replace(s->dir, "latest", pointer, err, cap) != 0)
        return -1;
    int64_t *steps;
    int n = rundir_steps(s->dir->fd, &steps), below = 0;
    while (below < n && steps[below] <= step) below++;
    for (int i = 0; keep_last > 0 && i < below - keep_last; i++) {
        char old[32], failed[1400];
        snprintf(old, sizeof old, "step_%06lld", (long long)steps[i]);
        /* a checkpoint that cannot be pruned costs disk space, not the run */
        if (rundir_remove(s->dir, old, 1, failed, sizeof failed) != 0)
            fprintf(stderr, "infmoe: warning: %s\n", failed);
    }
    free(steps);
    return 0;
}

/*
 * Bytes a checkpoint of m needs on disk: params, m and v in fp32, with room
 * for HDF5's metadata (object headers and chunk indexes, a few KiB a dataset)
 * and the layer state.
 */
static uint64_t save_bytes(const gpt_model *m) {
    uint64_t bytes = 1u << 20;
    for (int t = 0; t < m->tensors.n; t++) {
        const tensor_spec *s = &m->tensors.t[t];
        uint64_t numel = s->numel / (size_t)s->shape[0] * (size_t)s->global_dim0;
        bytes += 3 * (numel * sizeof(float) + (8u << 10)) + numel * sizeof(float) * 3 / 64;
    }
    return bytes;
}

/*
 * Rank 0, before any rank writes: what the publish replaces must be infmoe's
 * own, a save of this step that died is removed, and step_NNNNNN.tmp is made
 * afresh with the checkpoint's space reserved in it. Running out of space or
 * quota is met here, where every rank can leave together, rather than inside
 * HDF5's collective writes, where it cannot.
 */
static int save_begin(const ckpt_saving *s, const gpt_model *m, char *err, size_t cap) {
    if (rundir_check(s->dir, s->final, 1, err, cap) != 0 ||
        rundir_check(s->dir, "latest", 0, err, cap) != 0 ||
        rundir_remove(s->dir, s->tmp, 1, err, cap) != 0 || rundir_mkdir(s->dir, s->tmp, err, cap) != 0)
        return -1;
    if (rundir_reserve(s->dir, s->tmp, save_bytes(m), err, cap) == 0) return 0;
    char also[1400]; /* the reservation's message is the one to report */
    rundir_remove(s->dir, s->tmp, 1, also, sizeof also);
    return -1;
}

/*
 * A checkpoint never holds a nan or inf: when any rank's params, m or v has
 * one, every rank stops before writing, and latest keeps naming the last
 * finite checkpoint.
 */
static void refuse_non_finite(gpt_model *m, const dist_ctx *d, int64_t step) {
    char err[512] = "";
    for (int g = 0; g < 3 && !err[0]; g++)
        for (int t = 0; t < m->tensors.n && !err[0]; t++) {
            const tensor_spec *s = &m->tensors.t[t];
            size_t bad = count_non_finite(model_buffer(m, g) + s->offset, s->numel);
            if (bad)
                snprintf(err, sizeof err, "step %lld: tensor %s/%s holds %zu non-finite values (nan "
                         "or inf): not saving it, so latest still names the last finite checkpoint; "
                         "lower train.lr", (long long)step, GROUPS[g], s->name, bad);
        }
    dist_exit_if_error(d, err);
}

void ckpt_save(const run_dir *dir, gpt_model *m, const run_config *cfg, const dist_ctx *d,
               ckpt_position pos, int keep_last) {
    h5_quiet();
    refuse_non_finite(m, d, pos.step);
    ckpt_saving s = {.dir = dir, .d = d};
    snprintf(s.final, sizeof s.final, "step_%06lld", (long long)pos.step);
    snprintf(s.tmp, sizeof s.tmp, "%s.tmp", s.final);
    snprintf(s.file, sizeof s.file, "%s/%s/model.h5", dir->path, s.tmp);
    char err[1400] = "";
    if (d->rank == 0) save_begin(&s, m, err, sizeof err);
    dist_exit_if_error(d, err);
    hid_t fapl = h5_check(H5Pcreate(H5P_FILE_ACCESS));
    h5_check(H5Pset_fapl_mpio(fapl, d->world, MPI_INFO_NULL));
    /* the 1.8 file format: the first with dense attribute storage, so a config of any size fits */
    h5_check(H5Pset_libver_bounds(fapl, H5F_LIBVER_V18, H5F_LIBVER_LATEST));
    hid_t f = SAVE_CALL(&s, H5Fcreate(s.file, H5F_ACC_EXCL, H5P_DEFAULT, fapl));
    ckpt_meta meta = {{CKPT_FORMAT_VERSION, pos.step, pos.data_position,
                       pos.data_position * cfg->seq_len, d->size, d->ep, cfg->seed},
                      {cfg->text, config_resolved_text(cfg),
                       "counter-based: every draw is a function of (seed, layer, step, global "
                       "token), so no generator state is stored"}};
    for (int i = 0; i < N_META_INT; i++) ATTR_WRITE(h5_attr_put_i64(f, META_INT[i], meta.v[i]));
    for (int i = 0; i < N_META_TEXT; i++) ATTR_WRITE(h5_attr_put_str(f, META_TEXT[i], meta.text[i]));
    ATTR_WRITE(h5_attr_put_i64(f, META_CHECKSUM, meta_checksum(&meta)));
    free(meta.text[META_RESOLVED]);
    hid_t dxpl = h5_check(H5Pcreate(H5P_DATASET_XFER));
    h5_check(H5Pset_dxpl_mpio(dxpl, H5FD_MPIO_COLLECTIVE));
    for (int g = 0; g < 3; g++) {
        hid_t grp = SAVE_CALL(&s, H5Gcreate2(f, GROUPS[g], H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
        for (int t = 0; t < m->tensors.n; t++) {
            write_tensor(&s, grp, &m->tensors.t[t], model_buffer(m, g), dxpl);
            fault_point(d);
        }
        H5Gclose(grp);
    }
    hid_t state = SAVE_CALL(&s, H5Gcreate2(f, "state", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
    for (int l = 0; l < m->L; l++) {
        ffn_state_array arr[CKPT_MAX_STATE];
        int n_arr = ffn_state(&m->ffn[l], arr, CKPT_MAX_STATE);
        for (int a = 0; a < n_arr; a++) {
            char name[96];
            snprintf(name, sizeof name, "h.%d.%s", l, arr[a].name);
            hsize_t n = (hsize_t)arr[a].n;
            hid_t sp = h5_check(H5Screate_simple(1, &n, NULL));
            hid_t ds = SAVE_CALL(&s, H5Dcreate2(state, name, H5T_NATIVE_DOUBLE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT));
            if (d->rank != 0) h5_check(H5Sselect_none(sp));
            SAVE_CALL(&s, H5Dwrite(ds, H5T_NATIVE_DOUBLE, sp, sp, dxpl, arr[a].data));
            H5Dclose(ds);
            H5Sclose(sp);
        }
    }
    H5Gclose(state);
    H5Pclose(dxpl);
    SAVE_CALL(&s, H5Fclose(f));
    H5Pclose(fapl);
    if (d->rank == 0) publish(&s, pos.step, keep_last, err, sizeof err);
    dist_exit_if_error(d, err);
}

/* ---- resolve ---- */

static int is_dir(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

/*
 * --resume auto: the checkpoint `latest` names, which is the truth: after a
 * run resumed an older step into the same directory, its line continues, not
 * the abandoned run's higher steps. With no latest (a first save that died
 * between its rename and the pointer), the newest complete step_NNNNNN.
 */
static int resolve_auto(const char *run_dir, char *path, size_t cap) {
    int dfd = open(run_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) return 0;
    char name[64];
    int found = rundir_latest(dfd, name, sizeof name);
    if (found < 0)
        infmoe_die_all("%s/latest: %s; resume a checkpoint by its path or remove latest",
                       run_dir, name);
    if (found == 0) {
        int64_t *steps;
        int n = rundir_steps(dfd, &steps);
        if (n > 0) snprintf(name, sizeof name, "step_%06lld", (long long)steps[n - 1]);
        free(steps);
        found = n > 0;
    }
    close(dfd);
    if (found) snprintf(path, cap, "%s/%s", run_dir, name);
    return found;
}

int ckpt_resolve(const char *arg, const char *run_dir, char *path, size_t cap) {
    path[0] = '\0';
    if (strcmp(arg, "auto") == 0) return resolve_auto(run_dir, path, cap);
    char p[2048];
    snprintf(p, sizeof p, "%s", arg);
    size_t len = strlen(p);
    while (len > 1 && p[len - 1] == '/') p[--len] = '\0';
    if (len > 9 && strcmp(p + len - 9, "/model.h5") == 0) p[len - 9] = '\0';
    if (strcmp(p + (strlen(p) >= 6 ? strlen(p) - 6 : 0), "latest") == 0 && !is_dir(p)) {
        /* the pointer file: its one line names the checkpoint beside it (read as
         * --resume auto reads it: no links followed, only a step_NNNNNN name) */
        char *slash = strrchr(p, '/'), name[256];
        if (slash) *slash = '\0';
        const char *parent = slash ? (slash == p ? "/" : p) : ".";
        int dfd = open(parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        int found = dfd < 0 ? -1 : rundir_latest(dfd, name, sizeof name);
        if (dfd >= 0) close(dfd);
        if (found <= 0)
            infmoe_die_all("%s/latest: %s", parent, found == 0 ? "no such checkpoint pointer" :
                           dfd < 0 ? strerror(errno) : name);
        if (slash) {
            *slash = '/';
            snprintf(slash + 1, sizeof p - (size_t)(slash + 1 - p), "%s", name);
        } else {
            snprintf(p, sizeof p, "%s", name);
        }
    }
    len = strlen(p);
    if (len > 4 && strcmp(p + len - 4, ".tmp") == 0)
        infmoe_die_all("%s: an incomplete checkpoint (still under its temporary name: its save "
                       "did not finish); resume from the previous one", p);
    if (!is_dir(p)) {
        char t[2100];
        snprintf(t, sizeof t, "%s.tmp", p);
        if (is_dir(t))
            infmoe_die_all("%s: only an incomplete checkpoint %s exists (its save did not "
                           "finish)", p, t);
        infmoe_die_all("%s: no such checkpoint directory", p);
    }
    snprintf(path, cap, "%s", p);
    return 1;
}

/* ---- load ---- */

static hid_t open_checkpoint(const char *path, int all) {
    h5_quiet();
    char file[2100];
    snprintf(file, sizeof file, "%s/model.h5", path);
    if (access(file, R_OK) != 0) {
        if (all) infmoe_die_all("%s: no model.h5 in the checkpoint", path);
        return -1;
    }
    hid_t f = H5Fopen(file, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0 && all)
        infmoe_die_all("%s: not a readable HDF5 file (truncated or corrupt?)", file);
    return f;
}

/* Open checkpoint path and read its metadata; any problem ends the job with one line. */
static hid_t open_with_meta(const char *path, ckpt_meta *meta) {
    hid_t f = open_checkpoint(path, 1);
    char err[1024];
    if (meta_read(f, path, meta, err, sizeof err) != 0) infmoe_die_all("%s", err);
    return f;
}

char *ckpt_config_text(const char *path) {
    ckpt_meta meta;
    hid_t f = open_with_meta(path, &meta);
    H5Fclose(f);
    char *text = xstrdup(meta_config(&meta));
    meta_free(&meta);
    return text;
}

/*
 * Whether dataset ds has tensor s's global shape; on a mismatch, both shapes as
 * text ("256 x 32") in got and want.
 */
static int shape_matches(hid_t ds, const tensor_spec *s, char *got, char *want, size_t cap) {
    hsize_t dims[4] = {0}, exp[4];
    hid_t sp = h5_check(H5Dget_space(ds));
    int nd = H5Sget_simple_extent_ndims(sp), wd = global_dims(s, exp);
    H5Sget_simple_extent_dims(sp, dims, NULL);
    H5Sclose(sp);
    int same = nd == wd;
    for (int i = 0; same && i < nd; i++) same = dims[i] == exp[i];
    if (same) return 1;
    got[0] = want[0] = '\0';
    for (int i = 0; i < nd && i < 4; i++)
        snprintf(got + strlen(got), cap - strlen(got), "%s%llu", i ? " x " : "", (unsigned long long)dims[i]);
    for (int i = 0; i < wd; i++)
        snprintf(want + strlen(want), cap - strlen(want), "%s%llu", i ? " x " : "", (unsigned long long)exp[i]);
    return 0;
}

/* Read this rank's part of tensor s; returns 0, or -1 with a message in err. */
static int read_tensor(hid_t group, const char *gname, const tensor_spec *s, float *buf,
                       const char *path, char *err, size_t cap) {
    hid_t ds = H5Dopen2(group, s->name, H5P_DEFAULT);
    if (ds < 0) {
        snprintf(err, cap, "%s: the checkpoint has no tensor %s/%s (is it from another model?)",
                 path, gname, s->name);
        return -1;
    }
    char got[96], exp[96];
    if (!shape_matches(ds, s, got, exp, sizeof got)) {
        snprintf(err, cap, "%s: tensor %s/%s is [%s] in the checkpoint but the config makes it [%s]",
                 path, gname, s->name, got, exp);
        H5Dclose(ds);
        return -1;
    }
    hid_t fsp = h5_check(H5Dget_space(ds));
    int rc = 0;
    size_t bad = 0;
    for (int64_t i = 0; i < shard_blocks(s) && rc == 0; i++) { /* independent reads */
        size_t first;
        hid_t msp = select_block(fsp, s, i, &first);
        if (H5Dread(ds, H5T_NATIVE_FLOAT, msp, fsp, H5P_DEFAULT, buf + s->offset + first) < 0) {
            snprintf(err, cap, "%s: cannot read tensor %s/%s: checksum mismatch or damaged data",
                     path, gname, s->name);
            rc = -1;
        }
        H5Sclose(msp);
    }
    if (rc == 0 && (bad = count_non_finite(buf + s->offset, s->numel)) > 0) {
        snprintf(err, cap, "%s: tensor %s/%s holds %zu non-finite values (nan or inf): resume from "
                 "an earlier checkpoint", path, gname, s->name, bad);
        rc = -1;
    }
    H5Sclose(fsp);
    H5Dclose(ds);
    return rc;
}

ckpt_position ckpt_load(const char *path, gpt_model *m, const run_config *cfg, const dist_ctx *d) {
    ckpt_meta meta;
    hid_t f = open_with_meta(path, &meta);
    ckpt_position pos = {meta.v[META_STEP], meta.v[META_POSITION]};
    char err[1024] = "";
    if (meta.text[META_RESOLVED]) {
        run_config saved;
        config_load_text(&saved, path, meta.text[META_RESOLVED], 0, NULL, d->rank != 0);
        if (meta_consistent(&meta, &saved, path, err, sizeof err) != 0) infmoe_die_all("%s", err);
        char key[1100], was[1100], now[1100];
        if (config_arch_mismatch(&saved, cfg, key, was, now, sizeof was))
            infmoe_die_all("%s: %.100s is %.200s in the checkpoint but %.200s in this run's config: "
                           "a resumed run keeps the architecture (train into a new output.dir to "
                           "change it)", path, key, was, now);
        config_free(&saved);
    }
    meta_free(&meta);
    for (int g = 0; g < 3 && !err[0]; g++) {
        hid_t grp = H5Gopen2(f, GROUPS[g], H5P_DEFAULT);
        if (grp < 0) {
            snprintf(err, sizeof err, "%s: the checkpoint has no group '%s'", path, GROUPS[g]);
            break;
        }
        for (int t = 0; t < m->tensors.n && !err[0]; t++)
            read_tensor(grp, GROUPS[g], &m->tensors.t[t], model_buffer(m, g), path, err, sizeof err);
        H5Gclose(grp);
    }
    for (int l = 0; l < m->L && !err[0]; l++) {
        ffn_state_array arr[CKPT_MAX_STATE];
        int n_arr = ffn_state(&m->ffn[l], arr, CKPT_MAX_STATE);
        for (int a = 0; a < n_arr && !err[0]; a++) {
            char name[112];
            snprintf(name, sizeof name, "state/h.%d.%s", l, arr[a].name);
            if (H5Lexists(f, "state", H5P_DEFAULT) > 0 && H5Lexists(f, name, H5P_DEFAULT) == 0) {
                /* saved without it (the option that keeps it was off): it starts afresh */
                if (d->rank == 0)
                    printf("note: %s has no %s (saved with the option that keeps it off); it "
                           "starts from its initial value\n", path, name);
                continue;
            }
            hid_t ds = H5Dopen2(f, name, H5P_DEFAULT);
            if (ds < 0 || H5Dread(ds, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, arr[a].data) < 0)
                snprintf(err, sizeof err, "%s: cannot read %s", path, name);
            if (ds >= 0) H5Dclose(ds);
        }
    }
    H5Fclose(f);
    /* ranks read different parts, so one may fail where others succeed */
    dist_exit_if_error(d, err);
    return pos;
}

/* ---- infmoe ckpt info | verify ---- */

static void ckpt_usage(FILE *f) {
    fprintf(f, "usage: infmoe ckpt info PATH\n"
               "       infmoe ckpt verify PATH\n"
               "\n"
               "PATH: a checkpoint directory (checkpoints/<run>/step_NNNNNN), its model.h5,\n"
               "or a run's 'latest' pointer.\n"
               "  info    step, position, layout it was saved with, config, tensors and shapes\n"
               "  verify  check the metadata checksum and counters, read every tensor (Fletcher32\n"
               "          checksums), check every shape against the checkpoint's config and\n"
               "          every value for nan and inf; names the first problem; exit 1 if any\n");
}

static int ckpt_info_or_verify(const char *arg, int verify) {
    char path[2048], err[1024];
    ckpt_resolve(arg, ".", path, sizeof path);
    hid_t f = open_checkpoint(path, 1);
    ckpt_meta meta;
    if (meta_read(f, path, &meta, err, sizeof err) != 0) {
        if (!verify) infmoe_die_all("%s", err);
        printf("%s\n", err);
        H5Fclose(f);
        return 1;
    }
    const int64_t *v = meta.v;
    run_config cfg;
    config_load_text(&cfg, path, meta_config(&meta), 0, NULL, 0);
    gpt_model m;
    model_build(&m, &cfg, 0, NULL); /* global shapes */
    if (!verify) {
        printf("checkpoint %s\n  format version %lld | step %lld | sequences %lld | tokens %lld\n"
               "  saved by %lld ranks, ep %lld (loads on any rank count and ep)\n",
               path, (long long)v[META_VERSION], (long long)v[META_STEP], (long long)v[META_POSITION],
               (long long)v[META_TOKENS], (long long)v[META_RANKS], (long long)v[META_EP]);
        printf("  model: %d layers, C %d, %d heads, T %d, vocab %d (tokenizer %s), ffn %s\n", cfg.n_layer,
               cfg.n_embd, cfg.n_head, cfg.seq_len, cfg.vocab_size, tokenizer_name(cfg.tokenizer),
               ffn_kind_name(cfg.ffn_kind));
        size_t total = 0;
        printf("  tensors (each in params, adam_m, adam_v):\n");
        for (int t = 0; t < m.tensors.n; t++) {
            const tensor_spec *s = &m.tensors.t[t];
            hsize_t dims[4];
            int nd = global_dims(s, dims);
            char shape[96] = "";
            for (int i = 0; i < nd; i++) snprintf(shape + strlen(shape), sizeof shape - strlen(shape), "%s%llu", i ? " x " : "", (unsigned long long)dims[i]);
            size_t n = s->numel / (size_t)s->shape[0] * (size_t)dims[0];
            total += n;
            printf("    %-32s [%s]%s\n", s->name, shape, s->sharded ? "  (expert-sharded)" : "");
        }
        printf("  %zu parameters, %.1f MB with AdamW state\n", total, total * 12.0 / 1e6);
        for (int i = META_CONFIG; i <= META_RESOLVED && meta.text[i]; i++) {
            printf(i == META_CONFIG ? "  config as given (--set overrides as comments):\n"
                                    : "  effective config (what it was trained with):\n");
            for (char *line = strtok(meta.text[i], "\n"); line; line = strtok(NULL, "\n"))
                printf("    %s\n", line);
        }
    } else {
        int bad = v[META_VERSION] > 1 && meta_consistent(&meta, &cfg, path, err, sizeof err) != 0;
        if (bad) printf("%s\n", err);
        for (int g = 0; g < 3 && !bad; g++) {
            hid_t grp = H5Gopen2(f, GROUPS[g], H5P_DEFAULT);
            if (grp < 0) {
                printf("%s: missing group '%s'\n", path, GROUPS[g]);
                bad = 1;
                break;
            }
            for (int t = 0; t < m.tensors.n && !bad; t++) {
                const tensor_spec *s = &m.tensors.t[t];
                hid_t ds = H5Dopen2(grp, s->name, H5P_DEFAULT);
                if (ds < 0) {
                    printf("%s: missing tensor %s/%s\n", path, GROUPS[g], s->name);
                    bad = 1;
                    break;
                }
                char got[96], want[96];
                int same = shape_matches(ds, s, got, want, sizeof got);
                size_t n = s->numel / (size_t)s->shape[0] * (size_t)s->global_dim0;
                float *buf = same ? xmalloc(n * sizeof(float)) : NULL;
                size_t non_finite = 0;
                if (!same) {
                    printf("%s: tensor %s/%s is [%s] but the checkpoint's config makes it [%s]\n",
                           path, GROUPS[g], s->name, got, want);
                    bad = 1;
                } else if (H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0) {
                    printf("%s: tensor %s/%s is damaged (checksum mismatch or unreadable)\n", path, GROUPS[g], s->name);
                    bad = 1;
                } else if ((non_finite = count_non_finite(buf, n)) > 0) {
                    printf("%s: tensor %s/%s holds %zu non-finite values (nan or inf)\n", path,
                           GROUPS[g], s->name, non_finite);
                    bad = 1;
                }
                free(buf);
                H5Dclose(ds);
            }
            H5Gclose(grp);
        }
        if (!bad)
            printf("%s: ok: %d tensors x 3 checked (checksums, shapes, finite values), step %lld, %s\n",
                   path, m.tensors.n, (long long)v[META_STEP],
                   v[META_VERSION] > 1 ? "metadata checksum and counters"
                                       : "format 1: no metadata checksum to check");
        model_free(&m);
        config_free(&cfg);
        meta_free(&meta);
        H5Fclose(f);
        return bad;
    }
    model_free(&m);
    config_free(&cfg);
    meta_free(&meta);
    H5Fclose(f);
    return 0;
}

int ckpt_main(int argc, char **argv) {
    if (argc >= 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
        ckpt_usage(stdout);
        return 0;
    }
    if (argc != 3 || (strcmp(argv[1], "info") != 0 && strcmp(argv[1], "verify") != 0)) {
        ckpt_usage(stderr);
        return 1;
    }
    dist_ctx d;
    dist_init(&d, &argc, &argv);
    int rc = ckpt_info_or_verify(argv[2], strcmp(argv[1], "verify") == 0);
    dist_finalize(&d);
    return rc;
}
