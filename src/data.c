/* data: llm.c token shards, the seeded distributed sampler, prep (see data.h). */
#define _POSIX_C_SOURCE 200809L
#include "infmoe/data.h"

#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "infmoe/util.h"

static void open_shard(token_dataset *ds, int i, int vocab_size) {
    const char *path = ds->paths[i];
    int fd = open(path, O_RDONLY);
    if (fd < 0) infmoe_die_all("%s: cannot open token shard: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) infmoe_die_all("%s: cannot stat: %s", path, strerror(errno));
    size_t header_bytes = SHARD_HEADER_INTS * sizeof(int32_t);
    if ((size_t)st.st_size < header_bytes)
        infmoe_die_all("%s: not a token shard: %lld bytes, shorter than the %zu-byte header "
                   "(write shards with 'infmoe prep')",
                   path, (long long)st.st_size, header_bytes);
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) infmoe_die_all("%s: cannot map: %s", path, strerror(errno));
    const int32_t *h = map;
    if (h[0] != SHARD_MAGIC)
        infmoe_die_all("%s: not a token shard: magic %d, expected %d (write shards with "
                   "'infmoe prep')",
                   path, h[0], SHARD_MAGIC);
    if (h[1] != SHARD_VERSION)
        infmoe_die_all("%s: token shard version %d, expected %d", path, h[1], SHARD_VERSION);
    if (h[2] < 0) infmoe_die_all("%s: negative token count %d in the header", path, h[2]);
    size_t n = (size_t)(uint32_t)h[2];
    size_t expect = header_bytes + n * sizeof(uint16_t);
    if ((size_t)st.st_size != expect)
        infmoe_die_all("%s: truncated or padded token shard: header says %zu tokens (%zu bytes), "
                   "file has %lld bytes",
                   path, n, expect, (long long)st.st_size);
    if (n < (size_t)ds->seq_len + 1)
        infmoe_die_all("%s: %zu tokens, fewer than one sequence of seq_len + 1 = %d", path, n,
                   ds->seq_len + 1);
    const uint16_t *tok = (const uint16_t *)((const char *)map + header_bytes);
    uint16_t max = 0;
    for (size_t k = 0; k < n; k++)
        if (tok[k] > max) max = tok[k];
    if (max >= vocab_size)
        infmoe_die_all("%s: token id %u is outside model.vocab_size %d", path, (unsigned)max,
                   vocab_size);
    ds->maps[i] = map;
    ds->map_len[i] = (size_t)st.st_size;
    ds->tokens[i] = tok;
    ds->n_tokens[i] = n;
}

void data_open(token_dataset *ds, const char *pattern, int seq_len, int vocab_size,
               uint64_t seed) {
    memset(ds, 0, sizeof *ds);
    ds->seq_len = seq_len;
    ds->seed = seed;
    ds->perm_epoch = -1;
    glob_t g;
    int rc = glob(pattern, 0, NULL, &g);
    if (rc == GLOB_NOMATCH) infmoe_die_all("%s: no such token shard (run 'make data' or 'infmoe prep')", pattern);
    if (rc != 0) infmoe_die_all("%s: cannot list token shards", pattern);
    ds->n_shards = (int)g.gl_pathc;
    ds->paths = xcalloc((size_t)ds->n_shards, sizeof(char *));
    ds->tokens = xcalloc((size_t)ds->n_shards, sizeof(uint16_t *));
    ds->n_tokens = xcalloc((size_t)ds->n_shards, sizeof(size_t));
    ds->maps = xcalloc((size_t)ds->n_shards, sizeof(void *));
    ds->map_len = xcalloc((size_t)ds->n_shards, sizeof(size_t));
    ds->window_start = xcalloc((size_t)ds->n_shards + 1, sizeof(uint64_t));
    for (int i = 0; i < ds->n_shards; i++) {
        ds->paths[i] = xstrdup(g.gl_pathv[i]);
        open_shard(ds, i, vocab_size);
        ds->window_start[i + 1] = ds->window_start[i] + (ds->n_tokens[i] - 1) / (size_t)seq_len;
    }
    globfree(&g);
    ds->n_windows = ds->window_start[ds->n_shards];
}

void data_close(token_dataset *ds) {
    for (int i = 0; i < ds->n_shards; i++) {
        munmap(ds->maps[i], ds->map_len[i]);
        free(ds->paths[i]);
    }
    free(ds->paths);
    free(ds->tokens);
    free(ds->n_tokens);
    free(ds->maps);
    free(ds->map_len);
    free(ds->window_start);
    free(ds->perm);
    memset(ds, 0, sizeof *ds);
}

static void copy_window(const token_dataset *ds, uint64_t w, int32_t *in, int32_t *tg) {
    int s = 0;
    while (w >= ds->window_start[s + 1]) s++;
    const uint16_t *t = ds->tokens[s] + (w - ds->window_start[s]) * (uint64_t)ds->seq_len;
    for (int j = 0; j < ds->seq_len; j++) {
        in[j] = t[j];
        tg[j] = t[j + 1];
    }
}

/* Fisher-Yates shuffle of the windows, seeded by (seed, epoch). */
static void shuffle_epoch(token_dataset *ds, int64_t epoch) {
    if (ds->perm_epoch == epoch) return;
    if (!ds->perm) ds->perm = xcalloc(ds->n_windows, sizeof(uint64_t));
    for (uint64_t i = 0; i < ds->n_windows; i++) ds->perm[i] = i;
    rng_state r;
    rng_seed(&r, ds->seed * 0x100000001b3ULL + (uint64_t)epoch + 1);
    for (uint64_t i = ds->n_windows - 1; i > 0; i--) {
        uint64_t j = rng_u64(&r) % (i + 1);
        uint64_t t = ds->perm[i];
        ds->perm[i] = ds->perm[j];
        ds->perm[j] = t;
    }
    ds->perm_epoch = epoch;
}

void data_train_batch(token_dataset *ds, uint64_t first, int n_seq, int32_t *inputs,
                      int32_t *targets) {
    for (int i = 0; i < n_seq; i++) {
        uint64_t g = first + (uint64_t)i;
        shuffle_epoch(ds, (int64_t)(g / ds->n_windows));
        copy_window(ds, ds->perm[g % ds->n_windows], inputs + (size_t)i * ds->seq_len,
                    targets + (size_t)i * ds->seq_len);
    }
}

void data_eval_batch(token_dataset *ds, uint64_t first, int n_seq, int32_t *inputs,
                     int32_t *targets) {
    for (int i = 0; i < n_seq; i++)
        copy_window(ds, (first + (uint64_t)i) % ds->n_windows, inputs + (size_t)i * ds->seq_len,
                    targets + (size_t)i * ds->seq_len);
}

int data_write_shard(const char *path, const uint16_t *tokens, size_t n) {
    if (n > (size_t)INT32_MAX) {
        errno = EFBIG;
        return -1;
    }
    /* Written under a temporary name and renamed, so a crash never leaves half a shard. */
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) return -1;
    int32_t header[SHARD_HEADER_INTS] = {0};
    header[0] = SHARD_MAGIC;
    header[1] = SHARD_VERSION;
    header[2] = (int32_t)n;
    int ok = fwrite(header, sizeof header, 1, f) == 1 &&
             (n == 0 || fwrite(tokens, sizeof(uint16_t), n, f) == n);
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        errno = e;
        return -1;
    }
    return 0;
}

static void prep_usage(FILE *f) {
    fprintf(f,
            "usage: infmoe prep --text FILE [FILE ...] --out DIR [--val-fraction F]\n"
            "\n"
            "Tokenise text files byte by byte (vocabulary 256) into token shards:\n"
            "DIR/train.bin and DIR/val.bin, the last F of the bytes (default 0.1).\n"
            "Shards use the llm.c format (256 x int32 header, uint16 tokens).\n");
}

int data_prep_main(int argc, char **argv) {
    const char *out = NULL;
    double val_fraction = 0.1;
    int first_text = -1, n_text = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            prep_usage(stdout);
            return 0;
        } else if (strcmp(argv[i], "--out") == 0 && i + 1 < argc) {
            out = argv[++i];
        } else if (strcmp(argv[i], "--val-fraction") == 0 && i + 1 < argc) {
            char *end;
            val_fraction = strtod(argv[++i], &end);
            if (*end || !(val_fraction > 0 && val_fraction < 1)) {
                fprintf(stderr, "infmoe prep: --val-fraction %s: expected a number in (0, 1)\n",
                        argv[i]);
                return 1;
            }
        } else if (strcmp(argv[i], "--text") == 0) {
            first_text = i + 1;
            while (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0) {
                i++;
                n_text++;
            }
        } else {
            fprintf(stderr, "infmoe prep: unknown argument '%s'\n", argv[i]);
            prep_usage(stderr);
            return 1;
        }
    }
    if (!out || n_text == 0) {
        fprintf(stderr, "infmoe prep: need --text FILE... and --out DIR\n");
        prep_usage(stderr);
        return 1;
    }
    size_t cap = 1 << 20, n = 0;
    uint16_t *tok = xmalloc(cap * sizeof(uint16_t));
    for (int i = 0; i < n_text; i++) {
        size_t len;
        char *text = read_text_file(argv[first_text + i], &len);
        if (!text) {
            fprintf(stderr, "infmoe prep: %s: cannot read: %s\n", argv[first_text + i],
                    strerror(errno));
            free(tok);
            return 1;
        }
        if (n + len > cap) {
            while (n + len > cap) cap *= 2;
            tok = xrealloc(tok, cap * sizeof(uint16_t));
        }
        for (size_t k = 0; k < len; k++) tok[n++] = (unsigned char)text[k];
        free(text);
    }
    size_t n_val = (size_t)((double)n * val_fraction);
    if (n_val < 2 || n - n_val < 2) {
        fprintf(stderr, "infmoe prep: only %zu bytes of text: too little for a train/val split\n",
                n);
        free(tok);
        return 1;
    }
    if (mkdir_p(out) != 0) {
        fprintf(stderr, "infmoe prep: cannot create %s: %s\n", out, strerror(errno));
        free(tok);
        return 1;
    }
    char path[4096];
    const char *names[2] = {"train.bin", "val.bin"};
    const uint16_t *parts[2] = {tok, tok + (n - n_val)};
    size_t counts[2] = {n - n_val, n_val};
    for (int p = 0; p < 2; p++) {
        snprintf(path, sizeof path, "%s/%s", out, names[p]);
        if (data_write_shard(path, parts[p], counts[p]) != 0) {
            fprintf(stderr, "infmoe prep: cannot write %s: %s\n", path, strerror(errno));
            free(tok);
            return 1;
        }
        printf("wrote %s: %zu tokens\n", path, counts[p]);
    }
    free(tok);
    return 0;
}
