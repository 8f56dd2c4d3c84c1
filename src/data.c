/* data: llm.c token shards and the seeded distributed sampler (see data.h). */
#define _POSIX_C_SOURCE 200809L
#include "infmoe/data.h"

#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "infmoe/config.h"
#include "infmoe/util.h"

/* Read `bytes` at `offset` of fd in full: 0, or -1 (an error or a file that ends sooner). */
static int read_at(int fd, void *buf, size_t bytes, off_t offset) {
    char *p = buf;
    while (bytes > 0) {
        ssize_t got = pread(fd, p, bytes, offset);
        if (got < 0 && errno == EINTR) continue;
        if (got == 0) errno = 0; /* the file ends sooner */
        if (got <= 0) return -1;
        p += got;
        bytes -= (size_t)got;
        offset += got;
    }
    return 0;
}

static void open_shard(token_dataset *ds, int i, int vocab_size, int tokenizer) {
    const char *path = ds->paths[i], *why;
    int fd = open_regular_file(path, &why);
    if (fd < 0) infmoe_die_all("%s: cannot open token shard: %s", path, why);
    struct stat st;
    if (fstat(fd, &st) != 0) infmoe_die_all("%s: cannot stat: %s", path, strerror(errno));
    size_t header_bytes = SHARD_HEADER_INTS * sizeof(int32_t);
    if ((size_t)st.st_size < header_bytes)
        infmoe_die_all("%s: not a token shard: %lld bytes, shorter than the %zu-byte header "
                   "(write shards with 'infmoe prep')",
                   path, (long long)st.st_size, header_bytes);
    int32_t h[SHARD_HEADER_INTS];
    if (read_at(fd, h, header_bytes, 0) != 0)
        infmoe_die_all("%s: cannot read the header: %s", path, errno ? strerror(errno) : "file shrank");
    if (h[0] != SHARD_MAGIC)
        infmoe_die_all("%s: not a token shard: magic %d, expected %d (write shards with "
                   "'infmoe prep')",
                   path, h[0], SHARD_MAGIC);
    if (h[1] != SHARD_VERSION)
        infmoe_die_all("%s: token shard version %d, expected %d", path, h[1], SHARD_VERSION);
    if (h[2] < 0) infmoe_die_all("%s: negative token count %d in the header", path, h[2]);
    int recorded = h[SHARD_HEADER_TOKENIZER] - 1;
    if (recorded >= 0 && recorded != tokenizer) {
        if (recorded > TOKENIZER_GPT2)
            infmoe_die_all("%s: header[%d] = %d names no tokenizer infmoe knows", path, SHARD_HEADER_TOKENIZER,
                           h[SHARD_HEADER_TOKENIZER]);
        infmoe_die_all("%s: token shard written with the %s tokenizer, but data.tokenizer is %s (set "
                       "data.tokenizer: %s)",
                       path, tokenizer_name(recorded), tokenizer_name(tokenizer), tokenizer_name(recorded));
    }
    size_t n = (size_t)(uint32_t)h[2];
    size_t expect = header_bytes + n * sizeof(uint16_t);
    if ((size_t)st.st_size != expect)
        infmoe_die_all("%s: truncated or padded token shard: header says %zu tokens (%zu bytes), "
                   "file has %lld bytes",
                   path, n, expect, (long long)st.st_size);
    if (n < (size_t)ds->seq_len + 1)
        infmoe_die_all("%s: %zu tokens, fewer than one sequence of seq_len + 1 = %d", path, n,
                   ds->seq_len + 1);
    enum { CHUNK = 1 << 16 };
    uint16_t *buf = xmalloc(CHUNK * sizeof(uint16_t)), max = 0;
    for (size_t k = 0; k < n; k += CHUNK) {
        size_t m = n - k < CHUNK ? n - k : CHUNK;
        if (read_at(fd, buf, m * sizeof(uint16_t), (off_t)(header_bytes + k * sizeof(uint16_t))) != 0)
            infmoe_die_all("%s: cannot read the tokens: %s", path, errno ? strerror(errno) : "file shrank");
        for (size_t j = 0; j < m; j++)
            if (buf[j] > max) max = buf[j];
    }
    free(buf);
    if (max >= vocab_size)
        infmoe_die_all("%s: token id %u is outside model.vocab_size %d", path, (unsigned)max,
                   vocab_size);
    ds->fds[i] = fd;
    ds->n_tokens[i] = n;
}

void data_open(token_dataset *ds, const char *pattern, int seq_len, int vocab_size,
               uint64_t seed, int tokenizer) {
    memset(ds, 0, sizeof *ds);
    ds->seq_len = seq_len;
    ds->vocab_size = vocab_size;
    ds->seed = seed;
    ds->perm_epoch = -1;
    /* a path that exists is one shard even when its name has glob characters */
    struct stat st;
    glob_t g;
    memset(&g, 0, sizeof g);
    char *literal[1] = {(char *)pattern};
    if (stat(pattern, &st) == 0) {
        g.gl_pathc = 1;
        g.gl_pathv = literal;
    } else {
        int rc = glob(pattern, 0, NULL, &g);
        if (rc == GLOB_NOMATCH) infmoe_die_all("%s: no such token shard (run 'make data' or 'infmoe prep')", pattern);
        if (rc != 0) infmoe_die_all("%s: cannot list token shards", pattern);
    }
    ds->n_shards = (int)g.gl_pathc;
    /* every shard stays open (read with pread): room for thousands of them */
    struct rlimit lim;
    if (getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur != RLIM_INFINITY &&
        lim.rlim_cur < (rlim_t)ds->n_shards + 256) {
        lim.rlim_cur = lim.rlim_max == RLIM_INFINITY || lim.rlim_max > (rlim_t)ds->n_shards + 256
                           ? (rlim_t)ds->n_shards + 256 : lim.rlim_max;
        setrlimit(RLIMIT_NOFILE, &lim);
    }
    ds->paths = xcalloc((size_t)ds->n_shards, sizeof(char *));
    ds->fds = xcalloc((size_t)ds->n_shards, sizeof(int));
    ds->n_tokens = xcalloc((size_t)ds->n_shards, sizeof(size_t));
    ds->window_start = xcalloc((size_t)ds->n_shards + 1, sizeof(uint64_t));
    ds->window = xcalloc((size_t)seq_len + 1, sizeof(uint16_t));
    for (int i = 0; i < ds->n_shards; i++) {
        ds->paths[i] = xstrdup(g.gl_pathv[i]);
        open_shard(ds, i, vocab_size, tokenizer);
        ds->window_start[i + 1] = ds->window_start[i] + (ds->n_tokens[i] - 1) / (size_t)seq_len;
    }
    if (g.gl_pathv != literal) globfree(&g);
    ds->n_windows = ds->window_start[ds->n_shards];
}

void data_close(token_dataset *ds) {
    for (int i = 0; i < ds->n_shards; i++) {
        close(ds->fds[i]);
        free(ds->paths[i]);
    }
    free(ds->paths);
    free(ds->fds);
    free(ds->n_tokens);
    free(ds->window_start);
    free(ds->window);
    free(ds->perm);
    memset(ds, 0, sizeof *ds);
}

/* Window w's seq_len + 1 tokens as inputs and shifted targets. The shard is read,
 * not mapped, so one cut short or rewritten while training ends the job with a
 * message naming it instead of SIGBUS or tokens outside the vocabulary. */
static void copy_window(token_dataset *ds, uint64_t w, int32_t *in, int32_t *tg) {
    int s = 0;
    while (w >= ds->window_start[s + 1]) s++;
    size_t header_bytes = SHARD_HEADER_INTS * sizeof(int32_t), bytes = ((size_t)ds->seq_len + 1) * sizeof(uint16_t);
    off_t at = (off_t)(header_bytes + (w - ds->window_start[s]) * (uint64_t)ds->seq_len * sizeof(uint16_t));
    const uint16_t *t = ds->window;
    if (read_at(ds->fds[s], ds->window, bytes, at) != 0) {
        struct stat st;
        if (errno || fstat(ds->fds[s], &st) != 0)
            infmoe_die("%s: cannot read token shard: %s", ds->paths[s], strerror(errno));
        infmoe_die("%s: token shard changed while in use: %lld bytes now, %zu when opened",
                   ds->paths[s], (long long)st.st_size, header_bytes + ds->n_tokens[s] * sizeof(uint16_t));
    }
    for (int j = 0; j <= ds->seq_len; j++)
        if (t[j] >= ds->vocab_size)
            infmoe_die("%s: token shard changed while in use: token id %u at byte %lld is outside "
                       "model.vocab_size %d",
                       ds->paths[s], (unsigned)t[j], (long long)(at + 2 * j), ds->vocab_size);
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
