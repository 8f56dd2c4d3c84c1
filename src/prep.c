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
#include "infmoe/mceval.h"
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
            "Configs name the tokenizer as data.tokenizer (docs/config.md).\n"
            "\n"
            "       infmoe prep --mc-from FILE [FILE ...] --out FILE [--tokenizer byte|gpt2]\n"
            "                   [--val-fraction F] [--mc-items N] [--mc-completion BYTES]\n"
            "                   [--mc-seed S]\n"
            "\n"
            "Write a multiple-choice eval file (llm.c's format, for 'infmoe eval --mc') from\n"
            "the passages (text between blank or '%%' lines) in the last F of the text\n"
            "(default 0.1: the part --text would make val.bin; 1: all of it): context = a\n"
            "passage's start, the right completion = its end (at most BYTES, default 48),\n"
            "three distractors = the ends of passages of similar length. At most N items.\n");
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

/* ---- prep --mc-from: multiple-choice items from text ---- */

typedef struct {
    size_t start, split, end; /* passage bytes [start, end), completion from split */
    size_t index;             /* its place in text order */
} passage;

static int by_completion_length(const void *a, const void *b) {
    const passage *x = a, *y = b;
    size_t lx = x->end - x->split, ly = y->end - y->split;
    return lx < ly ? -1 : lx > ly ? 1 : x->start < y->start ? -1 : 1;
}

static void tokenize(bpe_encoder *enc, const char *s, size_t n, bpe_tokens *t) {
    t->n = 0;
    if (enc) {
        bpe_encode(enc, s, n, t);
        return;
    }
    for (size_t i = 0; i < n; i++) bpe_tokens_push(t, (unsigned char)s[i]);
}

/* Passages are the text between blank lines or lines that are only '%' (the fortune
 * files' separator), 48 to 4000 bytes long. The completion is a passage's end from
 * the whitespace nearest max(half, length - max_completion) on; the context is
 * what comes before. Its three distractors are the completions of passages near it
 * in completion length (drawn from the 16 nearest), the label a seeded draw. */
static int prep_mc(char **files, int n_files, const char *out, int tokenizer, const char *vocab_dir,
                   double fraction, uint64_t seed, int max_items, int max_completion) {
    size_t len = 0, cap = 0;
    char *text = NULL;
    for (int i = 0; i < n_files; i++) {
        size_t n;
        const char *why;
        char *t = read_text_file(files[i], &n, &why);
        if (!t) return fail(NULL, NULL, "%s: cannot read: %s", files[i], why);
        if (len + n + 1 > cap) text = xrealloc(text, cap = 2 * (len + n + 1));
        memcpy(text + len, t, n);
        len += n;
        free(t);
    }
    size_t from = len - (size_t)((double)len * fraction);
    passage *ps = NULL;
    size_t n_ps = 0, cap_ps = 0;
    for (size_t i = from; i < len;) {
        /* one passage: up to a blank line or a '%' line */
        size_t s = i, e = i;
        while (e < len) {
            size_t line_end = e;
            while (line_end < len && text[line_end] != '\n') line_end++;
            int sep = line_end == e || (line_end == e + 1 && text[e] == '%');
            if (sep) break;
            e = line_end < len ? line_end + 1 : len;
        }
        size_t next = e;
        while (next < len && text[next] != '\n') next++;
        i = next < len ? next + 1 : len;
        while (e > s && (text[e - 1] == '\n' || text[e - 1] == ' ')) e--;
        if (e - s < 48 || e - s > 4000) continue;
        size_t target = (e - s) / 2 > (e - s) - (size_t)max_completion ? s + (e - s) / 2 : e - (size_t)max_completion, split = 0;
        for (size_t k = 0; k < (e - s) / 2 && !split; k++) {
            if (target + k < e - 8 && (text[target + k] == ' ' || text[target + k] == '\n')) split = target + k;
            else if (target - k > s + 16 && (text[target - k] == ' ' || text[target - k] == '\n')) split = target - k;
        }
        if (!split) continue;
        if (n_ps == cap_ps) ps = xrealloc(ps, (cap_ps = 2 * cap_ps + 1024) * sizeof *ps);
        ps[n_ps] = (passage){s, split, e, n_ps};
        n_ps++;
    }
    if (n_ps < MC_COMPLETIONS * 2) {
        free(text);
        free(ps);
        return fail(NULL, NULL, "only %zu passages of 48 to 4000 bytes in the last %g of the text: too few for "
                    "multiple-choice items", n_ps, fraction);
    }
    char err[1024];
    bpe_vocab *vocab = NULL;
    if (tokenizer == TOKENIZER_GPT2 && !(vocab = bpe_load(vocab_dir, err, sizeof err))) {
        free(text);
        free(ps);
        return fail(NULL, NULL, "%s", err);
    }
    bpe_encoder *enc = vocab ? bpe_encoder_new(vocab) : NULL;
    /* the items in text order; distractors from neighbours in completion length */
    passage *sorted = xmalloc(n_ps * sizeof *sorted);
    memcpy(sorted, ps, n_ps * sizeof *ps);
    qsort(sorted, n_ps, sizeof *sorted, by_completion_length);
    size_t *rank_of = xmalloc(n_ps * sizeof(size_t)); /* text order -> completion-length order */
    for (size_t q = 0; q < n_ps; q++) rank_of[sorted[q].index] = q;
    rng_state r;
    rng_seed(&r, seed);
    mc_set set = {0};
    bpe_tokens ctx = {0}, comp[MC_COMPLETIONS] = {{0}};
    size_t n_items = n_ps < (size_t)max_items ? n_ps : (size_t)max_items;
    for (size_t i = 0; i < n_items; i++) {
        size_t q = rank_of[i], pick[MC_COMPLETIONS];
        int label = (int)(rng_u64(&r) % MC_COMPLETIONS), got = 0;
        for (int c = 0; c < MC_COMPLETIONS; c++) pick[c] = SIZE_MAX;
        pick[label] = q;
        while (got < MC_COMPLETIONS - 1) {
            size_t lo = q >= 8 ? q - 8 : 0, hi = lo + 17 < n_ps ? lo + 17 : n_ps;
            if (hi - lo < 17 && n_ps >= 17) lo = n_ps - 17;
            size_t cand = lo + rng_u64(&r) % (hi - lo);
            int dup = 0;
            for (int c = 0; c < MC_COMPLETIONS; c++) {
                if (pick[c] == SIZE_MAX) continue;
                const passage *a = &sorted[pick[c]], *b = &sorted[cand];
                dup |= pick[c] == cand || (a->end - a->split == b->end - b->split &&
                                           memcmp(text + a->split, text + b->split, a->end - a->split) == 0);
            }
            if (dup) continue;
            for (int c = 0; c < MC_COMPLETIONS; c++)
                if (pick[c] == SIZE_MAX) {
                    pick[c] = cand;
                    break;
                }
            got++;
        }
        const passage *p = &ps[i];
        size_t ctx_from = p->split - p->start > 1024 ? p->split - 1024 : p->start;
        tokenize(enc, text + ctx_from, p->split - ctx_from, &ctx);
        const uint16_t *cp[MC_COMPLETIONS];
        int cl[MC_COMPLETIONS];
        for (int c = 0; c < MC_COMPLETIONS; c++) {
            const passage *o = &sorted[pick[c]];
            tokenize(enc, text + o->split, o->end - o->split, &comp[c]);
            cp[c] = comp[c].ids;
            cl[c] = (int)comp[c].n;
        }
        mc_add(&set, label, ctx.ids, (int)ctx.n, cp, cl);
    }
    int rc = 0;
    if (mc_write(out, &set) != 0) rc = fail(NULL, NULL, "cannot write %s: %s", out, strerror(errno));
    else
        printf("wrote %s: %d items (%s tokens, 4 completions each, from %zu passages in the last %g of %d files)\n",
               out, set.n, tokenizer_name(tokenizer), n_ps, fraction, n_files);
    mc_free(&set);
    bpe_tokens_free(&ctx);
    for (int c = 0; c < MC_COMPLETIONS; c++) bpe_tokens_free(&comp[c]);
    bpe_encoder_free(enc);
    bpe_free(vocab);
    free(rank_of);
    free(sorted);
    free(ps);
    free(text);
    return rc;
}

int prep_main(int argc, char **argv) {
    const char *out = NULL, *vocab_dir = "data/gpt2";
    double val_fraction = 0.1;
    int first_text = -1, n_text = 0, tokenizer = TOKENIZER_BYTE, threads = omp_get_max_threads();
    int mc = 0, val_given = 0, max_items = 1 << 20, max_completion = 48;
    int64_t mc_seed = 1;
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
                val_fraction == 0)
                return fail(NULL, NULL, "--val-fraction %s: expected a number in (0, 1)", argv[i]);
            val_given = 1;
        } else if (strcmp(a, "--mc-seed") == 0 && has_value) {
            if (parse_int_arg("--mc-seed", argv[++i], 0, INT64_MAX, &mc_seed, err, sizeof err) < 0)
                return fail(NULL, NULL, "%s", err);
        } else if ((strcmp(a, "--mc-items") == 0 || strcmp(a, "--mc-completion") == 0) && has_value) {
            int64_t n;
            if (parse_int_arg(a, argv[++i], 1, a[5] == 'i' ? 1 << 24 : 4096, &n, err, sizeof err) < 0)
                return fail(NULL, NULL, "%s", err);
            *(a[5] == 'i' ? &max_items : &max_completion) = (int)n;
        } else if (strcmp(a, "--text") == 0 || strcmp(a, "--mc-from") == 0) {
            mc = strcmp(a, "--mc-from") == 0;
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
        fprintf(stderr, "infmoe prep: need --text FILE... and --out DIR (or --mc-from FILE... and --out FILE)\n");
        usage(stderr);
        return 1;
    }
    if (mc) return prep_mc(argv + first_text, n_text, out, tokenizer, vocab_dir, val_given ? val_fraction : 0.1,
                           (uint64_t)mc_seed, max_items, max_completion);
    if (val_fraction == 1) return fail(NULL, NULL, "--val-fraction 1: expected a number in (0, 1)");
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
