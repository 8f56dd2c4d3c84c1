/* prep: text files -> token shards, streaming and parallel (see prep.h). */
#define _GNU_SOURCE
#include "infmoe/prep.h"

#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "infmoe/bpe.h"
#include "infmoe/config.h"
#include "infmoe/data.h"
#include "infmoe/util.h"

enum { PIECE_BYTES = 1 << 20 };

/* One file read in pieces that encode independently (cut at bpe_safe_cut). */
typedef struct {
    const char *path;
    int fd, eof;
    char *buf;
    size_t len, cap;
    size_t bytes; /* size of the file */
} reader;

/* aligned to a cache line: threads push tokens into neighbouring pieces */
typedef struct {
    char *text; /* kept from batch to batch, grown as needed */
    size_t len, cap;
    int doc_start; /* first piece of a file: gpt2 puts <|endoftext|> before it */
    bpe_tokens out;
} __attribute__((aligned(64))) piece;

static int reader_open(reader *r, const char *path, char *err, size_t cap) {
    memset(r, 0, sizeof *r);
    const char *why;
    r->path = path;
    r->fd = open_regular_file(path, &why);
    if (r->fd < 0) {
        snprintf(err, cap, "%s: cannot read: %s", path, why);
        return -1;
    }
    struct stat st;
    r->bytes = fstat(r->fd, &st) == 0 ? (size_t)st.st_size : 0;
    posix_fadvise(r->fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    return 0;
}

/* The next piece into p (p->len 0 at the end); -1 on a read error. */
static int reader_next(reader *r, int cut_anywhere, piece *p, char *err, size_t cap) {
    size_t want = PIECE_BYTES;
    for (;;) {
        while (!r->eof && r->len < want) {
            if (r->cap < want) r->buf = xrealloc(r->buf, r->cap = want);
            ssize_t got = read(r->fd, r->buf + r->len, want - r->len);
            if (got < 0 && errno == EINTR) continue;
            if (got < 0) {
                snprintf(err, cap, "%s: cannot read: %s", r->path, strerror(errno));
                return -1;
            }
            if (got == 0) r->eof = 1;
            r->len += (size_t)got;
        }
        size_t cut = r->eof ? r->len : cut_anywhere ? r->len : bpe_safe_cut(r->buf, r->len);
        if (cut == 0 && !r->eof) { /* no safe place to cut yet: read on */
            want *= 2;
            continue;
        }
        if (p->cap < cut) p->text = xrealloc(p->text, p->cap = cut);
        memcpy(p->text, r->buf, cut);
        memmove(r->buf, r->buf + cut, r->len - cut);
        r->len -= cut;
        p->len = cut;
        return 0;
    }
}

static void reader_close(reader *r) {
    if (r->fd >= 0) close(r->fd);
    free(r->buf);
    r->fd = -1;
    r->buf = NULL;
}

static int write_all(int fd, const void *p, size_t n, off_t at) {
    const char *c = p;
    while (n > 0) {
        ssize_t put = pwrite(fd, c, n, at);
        if (put < 0 && errno == EINTR) continue;
        if (put < 0) return -1;
        c += put;
        n -= (size_t)put;
        at += put;
    }
    return 0;
}

static int write_header(int fd, size_t n, int tokenizer) {
    int32_t h[SHARD_HEADER_INTS] = {0};
    h[0] = SHARD_MAGIC;
    h[1] = SHARD_VERSION;
    h[2] = (int32_t)n;
    h[SHARD_HEADER_TOKENIZER] = tokenizer + 1;
    return write_all(fd, h, sizeof h, 0);
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: infmoe prep --text FILE [FILE ...] --out DIR [--tokenizer byte|gpt2]\n"
            "                   [--vocab DIR] [--val-fraction F] [--threads N]\n"
            "\n"
            "Tokenise text files into token shards DIR/train.bin and DIR/val.bin (the last\n"
            "F of the tokens, default 0.1), in the llm.c format (256 x int32 header, uint16\n"
            "tokens; header[3] records the tokenizer).\n"
            "  --tokenizer byte   one token a byte, vocabulary 256 (the default)\n"
            "  --tokenizer gpt2   GPT-2's BPE, vocabulary 50257; each file is a document and\n"
            "                     starts with <|endoftext|>, as in llm.c's shards\n"
            "  --vocab DIR        GPT-2's encoder.json and vocab.bpe (default data/gpt2,\n"
            "                     installed by scripts/fetch-gpt2-vocab.sh)\n"
            "  --threads N        encode pieces of the text on N threads (default: OpenMP's\n"
            "                     number, OMP_NUM_THREADS); the shards do not depend on N\n"
            "Files are read in pieces of about 1 MiB, so memory stays small for any corpus.\n"
            "Configs name the tokenizer as data.tokenizer (docs/config.md).\n");
}

static int fail(const char *tmp_train, const char *tmp_val, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(const char *tmp_train, const char *tmp_val, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "infmoe prep: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    if (tmp_train) unlink(tmp_train);
    if (tmp_val) unlink(tmp_val);
    return 1;
}

int prep_main(int argc, char **argv) {
    const char *out = NULL, *vocab_dir = "data/gpt2";
    double val_fraction = 0.1;
    int first_text = -1, n_text = 0, tokenizer = TOKENIZER_BYTE, threads = omp_get_max_threads();
    char err[4400];
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has_value = i + 1 < argc;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--out") == 0 && has_value) {
            out = argv[++i];
        } else if (strcmp(a, "--vocab") == 0 && has_value) {
            vocab_dir = argv[++i];
        } else if (strcmp(a, "--tokenizer") == 0 && has_value) {
            const char *t = argv[++i];
            if (strcmp(t, "byte") == 0) tokenizer = TOKENIZER_BYTE;
            else if (strcmp(t, "gpt2") == 0) tokenizer = TOKENIZER_GPT2;
            else return fail(NULL, NULL, "--tokenizer %s: expected byte or gpt2", t);
        } else if (strcmp(a, "--threads") == 0 && has_value) {
            int64_t n;
            if (parse_int_arg("--threads", argv[++i], 1, 4096, &n, err, sizeof err) < 0)
                return fail(NULL, NULL, "%s", err);
            threads = (int)n;
        } else if (strcmp(a, "--val-fraction") == 0 && has_value) {
            if (parse_float_arg("--val-fraction", argv[++i], 0, 1, &val_fraction, err, sizeof err) < 0 ||
                val_fraction == 0 || val_fraction == 1)
                return fail(NULL, NULL, "--val-fraction %s: expected a number in (0, 1)", argv[i]);
        } else if (strcmp(a, "--text") == 0) {
            first_text = i + 1;
            while (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0) {
                i++;
                n_text++;
            }
        } else {
            fprintf(stderr, "infmoe prep: unknown argument '%s'%s\n", a,
                    strncmp(a, "--", 2) == 0 && !has_value ? " (or its value is missing)" : "");
            usage(stderr);
            return 1;
        }
    }
    if (!out || n_text == 0) {
        fprintf(stderr, "infmoe prep: need --text FILE... and --out DIR\n");
        usage(stderr);
        return 1;
    }
    bpe_vocab *vocab = NULL;
    if (tokenizer == TOKENIZER_GPT2 && !(vocab = bpe_load(vocab_dir, err, sizeof err)))
        return fail(NULL, NULL, "%s", err);
    /* every file must open before anything is written */
    for (int i = 0; i < n_text; i++) {
        reader r;
        if (reader_open(&r, argv[first_text + i], err, sizeof err) < 0) {
            bpe_free(vocab);
            return fail(NULL, NULL, "%s", err);
        }
        reader_close(&r);
    }
    if (mkdir_p(out) != 0) {
        bpe_free(vocab);
        return fail(NULL, NULL, "cannot create %s: %s", out, strerror(errno));
    }
    char train_path[4096], val_path[4096], tmp_train[4200], tmp_val[4200];
    snprintf(train_path, sizeof train_path, "%s/train.bin", out);
    snprintf(val_path, sizeof val_path, "%s/val.bin", out);
    snprintf(tmp_train, sizeof tmp_train, "%s.tmp", train_path);
    snprintf(tmp_val, sizeof tmp_val, "%s.tmp", val_path);
    int fd = open(tmp_train, O_RDWR | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0) {
        bpe_free(vocab);
        return fail(NULL, NULL, "cannot create %s: %s", tmp_train, strerror(errno));
    }
    if (write_header(fd, 0, tokenizer) != 0) {
        close(fd);
        bpe_free(vocab);
        return fail(tmp_train, NULL, "cannot write %s: %s", tmp_train, strerror(errno));
    }

    int batch_cap = 4 * threads;
    bpe_encoder **enc = xcalloc((size_t)threads, sizeof *enc);
    if (vocab)
        for (int t = 0; t < threads; t++) enc[t] = bpe_encoder_new(vocab);
    piece *batch = aligned_alloc(64, (size_t)batch_cap * sizeof *batch);
    if (!batch) INFMOE_FAIL("out of memory");
    memset(batch, 0, (size_t)batch_cap * sizeof *batch);
    size_t total_bytes = 0, n_tokens = 0, all_bytes = 0, next_report = 64u << 20;
    for (int i = 0; i < n_text; i++) {
        struct stat st;
        if (stat(argv[first_text + i], &st) == 0) all_bytes += (size_t)st.st_size;
    }
    double t0 = wall_time();
    int file = 0, status = 0, doc_start = 1;
    reader r;
    r.fd = -1;
    r.buf = NULL;
    while (status == 0 && file < n_text) {
        /* read a batch of pieces in order */
        int n = 0;
        while (n < batch_cap && file < n_text) {
            if (r.fd < 0 && reader_open(&r, argv[first_text + file], err, sizeof err) < 0) {
                status = -1;
                break;
            }
            piece *p = &batch[n];
            if (reader_next(&r, vocab == NULL, p, err, sizeof err) < 0) {
                status = -1;
                break;
            }
            p->doc_start = doc_start && vocab;
            doc_start = 0;
            if (p->len > 0 || p->doc_start) n++;
            if (r.eof && r.len == 0) {
                reader_close(&r);
                file++;
                doc_start = 1;
            }
        }
        /* encode them in parallel */
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
        for (int k = 0; k < n; k++) {
            piece *p = &batch[k];
            p->out.n = 0;
            if (!vocab) {
                if (p->out.cap < p->len) p->out.ids = xrealloc(p->out.ids, (p->out.cap = p->len) * sizeof(uint16_t));
                for (size_t j = 0; j < p->len; j++) p->out.ids[j] = (unsigned char)p->text[j];
                p->out.n = p->len;
            } else {
                if (p->doc_start) bpe_tokens_push(&p->out, (uint16_t)bpe_eot(vocab));
                bpe_encode(enc[omp_get_thread_num()], p->text, p->len, &p->out);
            }
        }
        /* and append them in order */
        for (int k = 0; k < n; k++) {
            piece *p = &batch[k];
            off_t at = (off_t)((SHARD_HEADER_INTS * sizeof(int32_t)) + n_tokens * sizeof(uint16_t));
            if (status == 0 && write_all(fd, p->out.ids, p->out.n * sizeof(uint16_t), at) != 0) {
                snprintf(err, sizeof err, "cannot write %s: %s", tmp_train, strerror(errno));
                status = -1;
            }
            n_tokens += p->out.n;
            total_bytes += p->len;
        }
        if (total_bytes >= next_report && status == 0) {
            double dt = wall_time() - t0;
            printf("prep: %.0f of %.0f MB, %zu tokens, %.1f MB/s\n", total_bytes / 1e6, all_bytes / 1e6, n_tokens,
                   total_bytes / 1e6 / (dt > 0 ? dt : 1e-9));
            fflush(stdout);
            next_report += 64u << 20;
        }
    }
    reader_close(&r);
    double secs = wall_time() - t0;
    for (int k = 0; k < batch_cap; k++) {
        bpe_tokens_free(&batch[k].out);
        free(batch[k].text);
    }
    free(batch);
    for (int t = 0; t < threads; t++) bpe_encoder_free(enc[t]);
    free(enc);
    bpe_free(vocab);
    if (status != 0) {
        close(fd);
        return fail(tmp_train, NULL, "%s", err);
    }

    /* the last val_fraction of the tokens -> val.bin */
    size_t n_val = (size_t)((double)n_tokens * val_fraction);
    if (n_val < 2 || n_tokens - n_val < 2) {
        close(fd);
        return fail(tmp_train, NULL, "only %zu tokens of text: too little for a train/val split", n_tokens);
    }
    if (n_tokens - n_val > (size_t)INT32_MAX) {
        close(fd);
        return fail(tmp_train, NULL, "%zu tokens: more than one shard holds (2^31 - 1); prep the text in parts "
                    "into several directories and train on a glob of them", n_tokens - n_val);
    }
    size_t header_bytes = SHARD_HEADER_INTS * sizeof(int32_t), n_train = n_tokens - n_val;
    int vfd = open(tmp_val, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (vfd < 0) {
        close(fd);
        return fail(tmp_train, NULL, "cannot create %s: %s", tmp_val, strerror(errno));
    }
    int ok = write_header(vfd, n_val, tokenizer) == 0;
    enum { CHUNK = 1 << 20 };
    uint16_t *buf = xmalloc(CHUNK * sizeof(uint16_t));
    for (size_t k = 0; ok && k < n_val; k += CHUNK) {
        size_t m = n_val - k < CHUNK ? n_val - k : CHUNK, bytes = m * sizeof(uint16_t);
        off_t at = (off_t)(header_bytes + (n_train + k) * sizeof(uint16_t));
        ok = pread(fd, buf, bytes, at) == (ssize_t)bytes &&
             write_all(vfd, buf, bytes, (off_t)(header_bytes + k * sizeof(uint16_t))) == 0;
    }
    free(buf);
    ok = ok && ftruncate(fd, (off_t)(header_bytes + n_train * sizeof(uint16_t))) == 0 &&
         write_header(fd, n_train, tokenizer) == 0;
    ok = (close(vfd) == 0) & (close(fd) == 0) && ok;
    if (!ok || rename(tmp_val, val_path) != 0 || rename(tmp_train, train_path) != 0)
        return fail(tmp_train, tmp_val, "cannot write %s or %s: %s", train_path, val_path, strerror(errno));
    printf("wrote %s: %zu tokens\n", train_path, n_train);
    printf("wrote %s: %zu tokens\n", val_path, n_val);
    printf("prep: %d files, %.1f MB of text -> %zu tokens (%s, %.2f bytes/token) in %.2f s: %.1f MB/s on %d thread%s\n",
           n_text, total_bytes / 1e6, n_tokens, tokenizer_name(tokenizer), (double)total_bytes / (double)n_tokens,
           secs, total_bytes / 1e6 / (secs > 0 ? secs : 1e-9), threads, threads == 1 ? "" : "s");
    return 0;
}
