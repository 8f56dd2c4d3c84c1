/*
 * test_fuzz_config: a seeded mutation fuzzer of the config reader.
 *
 * Mutates the small configs in configs/ and tests/configs/ (bit flips, deletions,
 * duplicated and swapped lines, key/value swaps, values of other types, huge
 * numbers, deep nesting, YAML directives and NUL bytes) and loads each mutant in a
 * child process the way `infmoe train` does: config_load, the layout checks for one
 * rank, then the training shards. Every mutant must be accepted, or refused with
 * exactly one line that names the config file (the shard, for a shard error); no
 * child may die of a signal or run past 20 s.
 *
 *   build/tests/test_fuzz_config              300 mutants, seed 1 (make test)
 *   FUZZ_N=5000 FUZZ_SEED=7 build/tests/test_fuzz_config
 *
 * Failing mutants are kept in the directory the last line names.
 */
#define _POSIX_C_SOURCE 200809L
#include <fcntl.h>
#include <glob.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "infmoe/config.h"
#include "infmoe/data.h"
#include "infmoe/util.h"

enum { MAX_MUTANT = 1 << 20, HANG_SECONDS = 20 };

typedef struct {
    char *b;
    size_t n;
} buf;

static rng_state R;
static size_t pick(size_t n) { return n ? (size_t)(rng_u64(&R) % n) : 0; }

/* Replace [at, at + len) of b with `with` (wn bytes), within MAX_MUTANT. */
static void splice(buf *b, size_t at, size_t len, const char *with, size_t wn) {
    if (b->n - len + wn > MAX_MUTANT) return;
    char *out = xrealloc(NULL, b->n - len + wn + 1);
    memcpy(out, b->b, at);
    memcpy(out + at, with, wn);
    memcpy(out + at + wn, b->b + at + len, b->n - at - len);
    b->n = b->n - len + wn;
    out[b->n] = '\0';
    free(b->b);
    b->b = out;
}

/* The line around byte i: [*s, *e), *e at its newline or the end. */
static void line_at(const buf *b, size_t i, size_t *s, size_t *e) {
    *s = i;
    while (*s > 0 && b->b[*s - 1] != '\n') (*s)--;
    *e = i;
    while (*e < b->n && b->b[*e] != '\n') (*e)++;
}

static const char *const values[] = {
    "[1, 2]", "{a: 1}", "abc", "\"\"", "~", "true", "-1", "0", "1", "2", "7", "1024", "65536",
    "2147483647", "2147483648", "-2147483649", "4294967304", "9223372036854775807",
    "99999999999999999999", "1e308", "-1e400", "1e-400", "nan", ".inf", "-.inf", "0x10", "1_000",
    "0.5", "1.0e-3", "'x'", "&a 3", "*a", "!!str 5", "!!binary aGk=", "|\n  text", ">\n  folded",
    "data/demo/val.bin", "data/demo/*.bin", "data/demo", "/dev/null", "data/demo/val.bin[",
};
static const char *const inserts[] = {
    "\n---\n", "\n...\n", "%YAML 1.1\n", "%TAG ! tag:x:\n", "? ", "\t", "\r", "\n", " ", "#", ":",
    "- ", "&a ", "*a", "<<: *a\n", "\xef\xbb\xbf", "\xff", "\"", "'", "{", "}", "[", "]", ",",
};
static const char *const keys[] = {
    "model:\n", "ffn:\n", "train:\n", "data:\n", "parallel:\n", "output:\n", "  n_layer: ",
    "  n_embd: ", "  n_head: ", "  seq_len: ", "  vocab_size: ", "  kind: ", "  every: ",
    "  experts: ", "  k: ", "  units: ", "  mask_block: ", "  keep: ", "  samples: ", "  steps: ",
    "  batch_size: ", "  warmup: ", "  lr: ", "  min_lr: ", "  ep: ", "  train: ", "  val: ",
    "  dir: ", "  latent_dim: ", "  mask: ", "  gate: ", "  precision: ",
};
#define COUNT(a) (sizeof(a) / sizeof(a[0]))

static void mutate(buf *b) {
    size_t i = pick(b->n + 1), s, e;
    switch (pick(10)) {
    case 0: /* flip a bit */
        if (b->n) b->b[pick(b->n)] ^= (char)(1u << pick(8));
        break;
    case 1: { /* delete a span */
        size_t len = 1 + pick(16);
        if (i + len > b->n) len = b->n - i;
        splice(b, i, len, "", 0);
        break;
    }
    case 2: { /* duplicate a line (duplicate keys, sections twice) */
        line_at(b, i < b->n ? i : 0, &s, &e);
        char *copy = xrealloc(NULL, e - s + 2);
        memcpy(copy, b->b + s, e - s);
        copy[e - s] = '\n';
        splice(b, s, 0, copy, e - s + 1);
        free(copy);
        break;
    }
    case 3: { /* swap a line with the next */
        line_at(b, i < b->n ? i : 0, &s, &e);
        if (e >= b->n) break;
        size_t s2 = e + 1, e2;
        line_at(b, s2, &s2, &e2);
        size_t l1 = e - s, l2 = e2 - s2;
        char *tmp = xrealloc(NULL, l1 + l2 + 2);
        memcpy(tmp, b->b + s2, l2);
        tmp[l2] = '\n';
        memcpy(tmp + l2 + 1, b->b + s, l1);
        splice(b, s, e2 - s, tmp, l1 + l2 + 1);
        free(tmp);
        break;
    }
    case 4: { /* key and value swapped: "  k: v" -> "  v: k" */
        line_at(b, i < b->n ? i : 0, &s, &e);
        char line[512];
        size_t len = e - s < sizeof line - 1 ? e - s : sizeof line - 1;
        memcpy(line, b->b + s, len);
        line[len] = '\0';
        char *colon = strstr(line, ": ");
        if (!colon) break;
        *colon = '\0';
        size_t ind = strspn(line, " ");
        char out[1100];
        int n = snprintf(out, sizeof out, "%.*s%s: %s", (int)ind, line, colon + 2, line + ind);
        splice(b, s, e - s, out, (size_t)n);
        break;
    }
    case 5: { /* a value of another type or size */
        line_at(b, i < b->n ? i : 0, &s, &e);
        char *colon = memchr(b->b + s, ':', e - s);
        if (!colon) break;
        size_t at = (size_t)(colon - b->b) + 1;
        const char *v = values[pick(COUNT(values))];
        char out[128];
        int n = snprintf(out, sizeof out, " %s", v);
        splice(b, at, e - at, out, (size_t)n);
        break;
    }
    case 6: { /* deep nesting, as a value or anywhere */
        size_t depth = 1 + pick(pick(2) ? 100 : 100000);
        char *nest = xrealloc(NULL, 2 * depth + 1);
        memset(nest, pick(2) ? '[' : '{', depth);
        for (size_t k = 0; k < depth; k++) nest[depth + k] = nest[0] == '[' ? ']' : '}';
        splice(b, i, 0, nest, 2 * depth);
        free(nest);
        break;
    }
    case 7: { /* YAML syntax and odd bytes */
        const char *t = inserts[pick(COUNT(inserts))];
        splice(b, i, 0, t, strlen(t));
        break;
    }
    case 8: /* a NUL byte */
        splice(b, i, 0, "", 1);
        break;
    case 9: { /* a key of the schema with a value, at a line start */
        line_at(b, i < b->n ? i : 0, &s, &e);
        char out[160];
        int n = snprintf(out, sizeof out, "%s%s\n", keys[pick(COUNT(keys))], values[pick(COUNT(values))]);
        splice(b, s, 0, out, (size_t)n);
        break;
    }
    }
}

static buf read_all(const char *path) {
    buf b = {NULL, 0};
    const char *why;
    b.b = read_text_file(path, &b.n, &why);
    if (!b.b) INFMOE_FAIL("%s: %s", path, why);
    return b;
}

static void write_all(const char *path, const buf *b) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(b->b, 1, b->n, f) != b->n || fclose(f) != 0) INFMOE_FAIL("cannot write %s", path);
}

/* Load `path` as infmoe train would, in this (child) process. */
static void load_as_train(const char *path) {
    run_config cfg;
    config_load(&cfg, path, 0, NULL, 0);
    config_check_layout(&cfg, 1, 0);
    printf("config accepted\n"); /* from here on errors name a shard */
    fflush(stdout);
    token_dataset ds;
    data_open(&ds, cfg.data_train, cfg.seq_len, cfg.vocab_size, (uint64_t)cfg.seed, cfg.tokenizer);
    data_close(&ds);
    config_free(&cfg);
}

static size_t slurp(const char *path, char *out, size_t cap) {
    FILE *f = fopen(path, "rb");
    size_t n = f ? fread(out, 1, cap - 1, f) : 0;
    if (f) fclose(f);
    out[n] = '\0';
    return n;
}

int main(void) {
    const char *env_n = getenv("FUZZ_N"), *env_seed = getenv("FUZZ_SEED");
    long n_mutants = env_n ? strtol(env_n, NULL, 10) : 300, seed = env_seed ? strtol(env_seed, NULL, 10) : 1;
    glob_t g;
    if (glob("configs/tiny-*.yaml", 0, NULL, &g) != 0 || glob("tests/configs/*.yaml", GLOB_APPEND, NULL, &g) != 0) {
        printf("FAIL config fuzzer: no seed configs (run from the repository root)\n");
        return 1;
    }
    char dir[] = "/tmp/infmoe-fuzz-XXXXXX";
    if (!mkdtemp(dir)) INFMOE_FAIL("cannot create a directory for the mutants");
    char out_path[64], err_path[64];
    snprintf(out_path, sizeof out_path, "%s/stdout", dir);
    snprintf(err_path, sizeof err_path, "%s/stderr", dir);
    long accepted = 0, refused = 0, failures = 0;
    double t0 = wall_time();
    for (long m = 0; m < n_mutants; m++) {
        rng_seed(&R, (uint64_t)seed * 1000003u + (uint64_t)m);
        const char *from = g.gl_pathv[pick(g.gl_pathc)];
        buf b = read_all(from);
        for (size_t k = 1 + pick(3); k > 0; k--) mutate(&b);
        char path[96];
        snprintf(path, sizeof path, "%s/mutant-%06ld.yaml", dir, m);
        write_all(path, &b);
        free(b.b);
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            int o = open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644), e = open(err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            dup2(o, 1);
            dup2(e, 2);
            alarm(HANG_SECONDS);
            load_as_train(path);
            exit(0);
        }
        int status;
        waitpid(pid, &status, 0);
        static char out[4096], err[65536];
        slurp(out_path, out, sizeof out);
        size_t n = slurp(err_path, err, sizeof err);
        int lines = 0;
        for (size_t k = 0; k < n; k++) lines += err[k] == '\n';
        int data_stage = strstr(out, "config accepted") != NULL;
        const char *problem = NULL;
        if (WIFSIGNALED(status))
            problem = WTERMSIG(status) == SIGALRM ? "hang (over 20 s)" : "crash (signal)";
        else if (WEXITSTATUS(status) == 0 && n == 0)
            accepted++;
        else if (WEXITSTATUS(status) == 0)
            problem = "accepted with output on stderr";
        else if (lines != 1 || err[n - 1] != '\n')
            problem = "refused without exactly one line";
        else if (!data_stage && strncmp(err, path, strlen(path)) != 0)
            problem = "refused with a line that does not start with the config file";
        else if (data_stage && strncmp(err, "infmoe: ", 8) != 0)
            problem = "shard refused with a line that is not an infmoe message";
        else
            refused++;
        if (problem) {
            failures++;
            char *nl = strchr(err, '\n');
            if (nl) *nl = '\0';
            if (failures <= 10) printf("  %s (from %s): %s: %.300s\n", path, from, problem, err);
        } else {
            unlink(path);
        }
    }
    unlink(out_path);
    unlink(err_path);
    globfree(&g);
    if (failures) {
        printf("FAIL config fuzzer: %ld of %ld mutants (seed %ld) crashed, hung or were refused "
               "without one line naming the file; kept in %s\n",
               failures, n_mutants, seed, dir);
        return 1;
    }
    rmdir(dir);
    printf("PASS config fuzzer: %ld mutants (seed %ld) in %.1f s: %ld accepted, %ld refused with one "
           "line naming the file; no crash, no hang\n",
           n_mutants, seed, wall_time() - t0, accepted, refused);
    return 0;
}
