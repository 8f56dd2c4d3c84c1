/*
 * bench_ckpt: checkpoint save and load speed against plain sequential file
 * writing measured in the same run on the same disk.
 *
 *   mpirun -np P bench_ckpt CONFIG DIR [--ep EP]
 *
 * Builds CONFIG's model (random weights), saves it to DIR (every rank, MPI-IO,
 * fsync before publishing), loads it back, and has rank 0 write and fsync one
 * plain file of the same size. Prints seconds and MB/s (MB = 1e6 bytes of
 * params + AdamW m and v).
 */
#define _POSIX_C_SOURCE 200809L
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "infmoe/ckpt.h"
#include "infmoe/dist.h"
#include "infmoe/gemm.h"
#include "infmoe/model.h"
#include "infmoe/util.h"

int main(int argc, char **argv) {
    if (argc < 3 || strcmp(argv[1], "--help") == 0) {
        printf("usage: mpirun -np P bench_ckpt CONFIG DIR [--ep EP]\n");
        return argc < 3;
    }
    dist_ctx d;
    dist_init(&d, &argc, &argv);
    int ep = argc > 4 && strcmp(argv[3], "--ep") == 0 ? atoi(argv[4]) : 1;
    run_config cfg;
    char ep_set[32];
    snprintf(ep_set, sizeof ep_set, "parallel.ep=%d", ep);
    char *sets[] = {ep_set};
    config_load(&cfg, argv[1], 1, sets, d.rank != 0);
    dist_set_layout(&d, ep);
    gpt_model m;
    model_build(&m, &cfg, 1, &d);
    model_init_params(&m, 1);
    memcpy(m.m, m.params, m.tensors.total * sizeof(float));
    memcpy(m.v, m.params, m.tensors.total * sizeof(float));
    gpt_model g; /* global sizes */
    model_build(&g, &cfg, 0, NULL);
    double bytes = 0;
    for (int t = 0; t < g.tensors.n; t++) bytes += 12.0 * (double)g.tensors.t[t].numel;
    run_dir dir;
    rundir_open(&dir, argv[2], &d);

    MPI_CHECK(MPI_Barrier(d.world));
    double t0 = wall_time();
    ckpt_save(&dir, &m, &cfg, &d, (ckpt_position){1, 1}, 1);
    double t_save = wall_time() - t0;
    char path[2048];
    ckpt_resolve("auto", argv[2], path, sizeof path);
    MPI_CHECK(MPI_Barrier(d.world));
    t0 = wall_time();
    ckpt_load(path, &m, &cfg, &d);
    MPI_CHECK(MPI_Barrier(d.world));
    double t_load = wall_time() - t0;

    double t_seq = 0.0;
    if (d.rank == 0) { /* the baseline: one process, one file, large writes, fsync */
        char file[2100];
        snprintf(file, sizeof file, "%s/sequential.bin", argv[2]);
        size_t chunk = 64u << 20;
        char *buf = xcalloc(chunk, 1);
        memset(buf, 1, chunk);
        t0 = wall_time();
        int fd = open(file, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        for (double left = bytes; left > 0; left -= (double)chunk) {
            size_t n = left < (double)chunk ? (size_t)left : chunk;
            if (fd < 0 || write(fd, buf, n) != (ssize_t)n) infmoe_die("cannot write %s", file);
        }
        fsync(fd);
        close(fd);
        t_seq = wall_time() - t0;
        unlink(file);
        free(buf);
        printf("bench_ckpt: %s | %.1f MB (params + AdamW m, v) | ranks %d ep %d\n", argv[1],
               bytes / 1e6, d.size, ep);
        printf("  save %.2f s = %.0f MB/s | load %.2f s = %.0f MB/s | sequential write %.2f s = "
               "%.0f MB/s | save / sequential = %.2f\n",
               t_save, bytes / 1e6 / t_save, t_load, bytes / 1e6 / t_load, t_seq,
               bytes / 1e6 / t_seq, t_seq / t_save);
    }
    model_free(&m);
    model_free(&g);
    config_free(&cfg);
    gemm_shutdown();
    rundir_close(&dir);
    dist_finalize(&d);
    return 0;
}
