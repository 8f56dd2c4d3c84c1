/*
 * The statistics file (stats.h5) on one process, through the writer API:
 *  - rows round-trip: /step, per-bucket counts, the derived metrics (CV, max/mean,
 *    unused buckets, top and bottom 20% shares) on counts with known answers;
 *    histogram datasets exist only for the layer that has them;
 *  - resume: reopening at step S drops the rows after S and appends after them;
 *    reopening with other layers is refused with a message;
 *  - SWMR: a reader that stays open sees rows appear while a writer process
 *    appends; after SIGKILL of the writer, every row it had flushed is there and
 *    the file reopens for appending (the dead writer's flags cleared).
 */
#define _POSIX_C_SOURCE 200809L
#include <hdf5.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "infmoe/statsfile.h"
#include "infmoe/util.h"
#include "stats_rows.h"

static const char *const AUX[] = {"importance", "load", "switch", "z", "moge"};

static void descs(stats_layer_desc d[2]) {
    memset(d, 0, 2 * sizeof *d);
    d[0].layer = 1;
    d[0].kind = "topk";
    d[0].bucket = "expert";
    d[0].n_buckets = 4;
    d[0].k = 2;
    d[0].n_aux = 5;
    for (int a = 0; a < 5; a++) d[0].aux_names[a] = AUX[a];
    d[1].layer = 3;
    d[1].kind = "infinite";
    d[1].bucket = "block";
    d[1].n_buckets = 5;
    d[1].n_aux = 1;
    d[1].aux_names[0] = "kl";
    d[1].z_bins = 4;
    d[1].z_hi = 1.0;
    d[1].sigma_bins = 3;
    d[1].sigma_hi = 2.0;
}

/* Row `step` of the synthetic run: layer 0 counts {0, s, 3s, 6s} (s = step), layer 1 ramps. */
static void make_rows(int64_t step, int64_t tok0[4], int64_t tok1[5], int64_t zh[4], int64_t sh[3],
                      stats_row rows[2]) {
    memset(rows, 0, 2 * sizeof *rows);
    tok0[0] = 0, tok0[1] = step, tok0[2] = 3 * step, tok0[3] = 6 * step;
    for (int b = 0; b < 5; b++) tok1[b] = step + b;
    for (int b = 0; b < 4; b++) zh[b] = step * 10 + b;
    for (int b = 0; b < 3; b++) sh[b] = step * 100 + b;
    rows[0].tokens = tok0;
    rows[0].n_tokens = 5 * step;
    rows[0].assignments = 10 * step;
    rows[0].dropped = step;
    rows[0].gate_entropy = 0.5;
    rows[0].top_gate = 0.75;
    rows[0].aux[3] = 0.001 * (double)step;
    rows[0].t_route = 1e-3;
    rows[1].tokens = tok1;
    rows[1].n_tokens = 100;
    rows[1].aux[0] = 0.25;
    rows[1].z_hist = zh;
    rows[1].sigma_hist = sh;
}

static int append_step(stats_writer *w, int64_t step) {
    int64_t t0[4], t1[5], zh[4], sh[3];
    stats_row rows[2];
    make_rows(step, t0, t1, zh, sh, rows);
    return stats_writer_append(w, step, rows);
}

/* Read /step (SWMR reader) into steps (cap); returns the row count, -1 on failure. */
static int64_t read_steps(const char *path, int64_t *steps, int64_t cap) {
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    H5Pset_file_locking(fapl, 0, 1);
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY | H5F_ACC_SWMR_READ, fapl);
    H5Pclose(fapl);
    if (f < 0) return -1;
    hid_t ds = H5Dopen2(f, "step", H5P_DEFAULT);
    hid_t sp = H5Dget_space(ds);
    hsize_t n = 0;
    H5Sget_simple_extent_dims(sp, &n, NULL);
    H5Sclose(sp);
    int64_t rc = (int64_t)n;
    if (n > 0 && (int64_t)n <= cap) {
        if (H5Dread(ds, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, steps) < 0) rc = -1;
    } else if ((int64_t)n > cap) {
        rc = -1;
    }
    H5Dclose(ds);
    H5Fclose(f);
    return rc;
}

/* Field `name` (int64[width]) of record `row` of the layer's /rows. */
static void read_row_i64(hid_t g, const char *name, hsize_t row, int width, int64_t *out) {
    hid_t ds = H5Dopen2(g, "rows", H5P_DEFAULT);
    hsize_t dim = (hsize_t)width, one = 1;
    hid_t a = H5Tarray_create2(H5T_NATIVE_INT64, 1, &dim);
    hid_t mt = H5Tcreate(H5T_COMPOUND, sizeof(int64_t) * (size_t)width);
    H5Tinsert(mt, name, 0, a);
    hid_t fsp = H5Dget_space(ds);
    H5Sselect_hyperslab(fsp, H5S_SELECT_SET, &row, NULL, &one, NULL);
    hid_t msp = H5Screate_simple(1, &one, NULL);
    memset(out, 0xff, sizeof(int64_t) * (size_t)width);
    H5Dread(ds, mt, msp, fsp, H5P_DEFAULT, out);
    H5Sclose(msp);
    H5Sclose(fsp);
    H5Tclose(mt);
    H5Tclose(a);
    H5Dclose(ds);
}

/* Whether the layer's records have field `name`. */
static int has_field(hid_t g, const char *name) {
    hid_t ds = H5Dopen2(g, "rows", H5P_DEFAULT);
    hid_t t = H5Dget_type(ds);
    int has = H5Tget_member_index(t, name) >= 0;
    H5Tclose(t);
    H5Dclose(ds);
    return has;
}

static void check_contents(const char *path, int64_t rows) {
    int64_t steps[64];
    CHECK(read_steps(path, steps, 64) == rows, "expected %lld rows", (long long)rows);
    for (int64_t i = 0; i < rows; i++) CHECK(steps[i] == i + 1, "row %lld has step %lld", (long long)i, (long long)steps[i]);
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY | H5F_ACC_SWMR_READ, H5P_DEFAULT);
    CHECK(f >= 0, "cannot open %s", path);
    if (f < 0) return;
    hid_t g0 = H5Gopen2(f, "layers/h.1", H5P_DEFAULT), g1 = H5Gopen2(f, "layers/h.3", H5P_DEFAULT);
    CHECK(g0 >= 0 && g1 >= 0, "layer groups h.1 and h.3");
    for (int64_t i = 0; i < rows; i++) {
        int64_t s = i + 1, t0[4], t1[5], zh[4], sh[3], want0[4], want1[5], wz[4], ws[3];
        stats_row r[2];
        make_rows(s, want0, want1, wz, ws, r);
        read_row_i64(g0, "tokens", (hsize_t)i, 4, t0);
        read_row_i64(g1, "tokens", (hsize_t)i, 5, t1);
        read_row_i64(g1, "z_hist", (hsize_t)i, 4, zh);
        read_row_i64(g1, "sigma_hist", (hsize_t)i, 3, sh);
        CHECK(memcmp(t0, want0, sizeof t0) == 0 && memcmp(t1, want1, sizeof t1) == 0, "tokens of row %lld", (long long)i);
        CHECK(memcmp(zh, wz, sizeof zh) == 0 && memcmp(sh, ws, sizeof sh) == 0, "histograms of row %lld", (long long)i);
        /* {0, s, 3s, 6s}: mean 2.5s, max/mean 2.4, CV sqrt(21/4)/2.5, top 20% (0.8 of
         * the largest) 4.8s/10s, bottom 20% 0, one unused, dropped s / 10s */
        CHECK(close_enough(metric(g0, "max_over_mean", (hsize_t)i), 2.4, 1e-12, 0), "max/mean");
        CHECK(close_enough(metric(g0, "cv", (hsize_t)i), sqrt(21.0 / 4.0) / 2.5, 1e-12, 0), "cv %g",
              metric(g0, "cv", (hsize_t)i));
        CHECK(close_enough(metric(g0, "top20_share", (hsize_t)i), 0.48, 1e-12, 0), "top 20%%");
        CHECK(metric(g0, "bottom20_share", (hsize_t)i) == 0.0, "bottom 20%%");
        CHECK(metric(g0, "unused", (hsize_t)i) == 1.0, "unused");
        CHECK(close_enough(metric(g0, "dropped_fraction", (hsize_t)i), 0.1, 1e-12, 0), "dropped fraction");
        CHECK(close_enough(metric(g0, "aux_z", (hsize_t)i), 0.001 * (double)s, 1e-12, 0), "aux_z");
        CHECK(metric(g0, "confidence", (hsize_t)i) == 0.75 && metric(g0, "gate_entropy", (hsize_t)i) == 0.5,
              "confidence and entropy");
        /* {s, s+1, ..., s+4}: bottom 20% is exactly the smallest bucket */
        CHECK(close_enough(metric(g1, "bottom20_share", (hsize_t)i), (double)s / (5.0 * s + 10.0), 1e-12, 0),
              "bottom 20%% of layer 3");
        CHECK(metric(g1, "aux_kl", (hsize_t)i) == 0.25, "aux_kl");
    }
    CHECK(!has_field(g0, "z_hist") && !has_field(g0, "sigma_hist") && has_field(g1, "z_hist"),
          "histograms only for the layer that has them");
    H5Gclose(g0);
    H5Gclose(g1);
    H5Fclose(f);
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

int main(void) {
    char dir[] = "/tmp/infmoe-test-stats-XXXXXX";
    ALWAYS(mkdtemp(dir));
    char path[256], err[2000];
    snprintf(path, sizeof path, "%s/stats.h5", dir);
    stats_layer_desc d[2];
    descs(d);

    /* round trip, then resume at step 4 of 6 and append 5..8 */
    stats_writer *w = stats_writer_open(path, d, 2, -1, "model: {}\n", err, sizeof err);
    CHECK(w != NULL, "create: %s", err);
    for (int s = 1; s <= 6 && w; s++) CHECK(append_step(w, s) == 0, "append %d", s);
    if (w) stats_writer_close(w);
    check_contents(path, 6);
    w = stats_writer_open(path, d, 2, 4, NULL, err, sizeof err);
    CHECK(w != NULL && stats_writer_rows(w) == 4, "reopen at step 4 keeps 4 rows: %s", w ? "" : err);
    for (int s = 5; s <= 8 && w; s++) CHECK(append_step(w, s) == 0, "append %d", s);
    if (w) stats_writer_close(w);
    check_contents(path, 8);
    stats_layer_desc other[2];
    descs(other);
    other[0].n_buckets = 8;
    w = stats_writer_open(path, other, 2, 8, NULL, err, sizeof err);
    CHECK(w == NULL && strstr(err, "h.1/rows"), "other layers refused (got: %s)", w ? "opened" : err);
    if (w) stats_writer_close(w);

    /* SWMR: a child appends a row every 20 ms and reports each through a pipe */
    int fds[2];
    ALWAYS(pipe(fds) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        stats_writer *cw = stats_writer_open(path, d, 2, -1, NULL, err, sizeof err);
        if (!cw) _exit(2);
        for (int64_t s = 1;; s++) {
            if (append_step(cw, s) != 0) _exit(3);
            if (write(fds[1], &s, sizeof s) != sizeof s) _exit(4);
            sleep_ms(20);
        }
    }
    close(fds[1]);
    int64_t reported = 0, s;
    while (reported < 3 && read(fds[0], &s, sizeof s) == sizeof s) reported = s;
    /* one reader kept open: refreshing it shows the new rows */
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    H5Pset_file_locking(fapl, 0, 1);
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY | H5F_ACC_SWMR_READ, fapl);
    H5Pclose(fapl);
    CHECK(f >= 0, "SWMR reader opens while the writer runs");
    hsize_t n1 = 0, n2 = 0;
    if (f >= 0) {
        hid_t ds = H5Dopen2(f, "step", H5P_DEFAULT);
        hid_t sp = H5Dget_space(ds);
        H5Sget_simple_extent_dims(sp, &n1, NULL);
        H5Sclose(sp);
        while (reported < (int64_t)n1 + 3 && read(fds[0], &s, sizeof s) == sizeof s) reported = s;
        H5Drefresh(ds);
        sp = H5Dget_space(ds);
        H5Sget_simple_extent_dims(sp, &n2, NULL);
        H5Sclose(sp);
        H5Dclose(ds);
        H5Fclose(f);
    }
    CHECK(n1 >= 3 && n2 >= n1 + 3, "rows appear to an open reader (%llu, then %llu)",
          (unsigned long long)n1, (unsigned long long)n2);
    while (reported < 25 && read(fds[0], &s, sizeof s) == sizeof s) reported = s;
    kill(pid, SIGKILL);
    int status;
    waitpid(pid, &status, 0);
    while (read(fds[0], &s, sizeof s) == sizeof s) reported = s; /* rows flushed before the kill */
    close(fds[0]);
    int64_t steps[64];
    int64_t rows = read_steps(path, steps, 64);
    CHECK(WIFSIGNALED(status) && rows >= reported && rows <= reported + 1,
          "after SIGKILL: %lld rows readable, %lld reported flushed", (long long)rows, (long long)reported);
    if (rows >= reported && rows > 0) check_contents(path, rows);
    w = stats_writer_open(path, d, 2, reported, NULL, err, sizeof err);
    CHECK(w != NULL && stats_writer_rows(w) == reported, "the killed writer's file reopens: %s", w ? "" : err);
    if (w) {
        CHECK(append_step(w, reported + 1) == 0, "append after the crash");
        stats_writer_close(w);
        check_contents(path, reported + 1);
    }
    unlink(path);
    rmdir(dir);
    return check_finish("stats: rows and derived metrics round-trip; resume drops later rows; SWMR reader "
                        "sees rows appear; SIGKILL keeps every flushed row");
}
