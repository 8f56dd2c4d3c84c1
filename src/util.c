/* util: errors, allocation, clock, files, random numbers (see util.h). */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE /* madvise's MADV_HUGEPAGE */
#include "infmoe/util.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <omp.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int infmoe_rank_for_messages = -1;
void (*infmoe_abort_hook)(int status) = NULL;
void (*infmoe_exit_hook)(void) = NULL;
int infmoe_quiet_rank = 0;

static void vreport(const char *where, const char *fmt, va_list ap) {
    char msg[2048];
    vsnprintf(msg, sizeof msg, fmt, ap);
    if (infmoe_rank_for_messages >= 0)
        fprintf(stderr, "infmoe: [rank %d] %s%s\n", infmoe_rank_for_messages, where, msg);
    else
        fprintf(stderr, "infmoe: %s%s\n", where, msg);
    fflush(stderr);
}

static void end_job(void) __attribute__((noreturn));
static void end_job(void) {
    fflush(stdout);
    if (infmoe_abort_hook) infmoe_abort_hook(1);
    exit(1);
}

void infmoe_die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vreport("", fmt, ap);
    va_end(ap);
    end_job();
}

void infmoe_exit(int status) {
    fflush(stdout);
    fflush(stderr);
    if (infmoe_exit_hook) infmoe_exit_hook();
    exit(status);
}

void infmoe_die_all(const char *fmt, ...) {
    if (!infmoe_quiet_rank) {
        char msg[2048];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        fprintf(stderr, "infmoe: %s\n", msg);
    }
    infmoe_exit(1);
}

void infmoe_fail_at(const char *file, int line, const char *fmt, ...) {
    char where[512];
    snprintf(where, sizeof where, "%s:%d: ", file, line);
    va_list ap;
    va_start(ap, fmt);
    vreport(where, fmt, ap);
    va_end(ap);
    end_job();
}

/*
 * Buffers of HUGE_MIN or more (parameters, optimizer state, gradients,
 * activations: GBs at GPT-2 small shapes) start on a 2 MiB boundary and ask for
 * transparent huge pages (MADV_HUGEPAGE, honoured where THP is "madvise" or
 * "always", ignored where it is off): one page fault zeroes 2 MiB instead of 4
 * KiB, and the TLB covers 512x the bytes. A first touch of a 4 KiB page costs
 * 10-20 us on some VMs, so a model of 14 GB spent a minute in page faults.
 */
#define HUGE_PAGE ((size_t)2 << 20)
#define HUGE_MIN (4 * HUGE_PAGE)

void *xmalloc(size_t size) {
    void *p = NULL;
    const size_t align = size >= HUGE_MIN ? HUGE_PAGE : 64;
    if (size > SIZE_MAX - align) infmoe_die("out of memory allocating %zu bytes", size);
    size_t rounded = (size + align - 1) / align * align;
    if (rounded == 0) rounded = 64;
    if (posix_memalign(&p, align, rounded) != 0)
        infmoe_die("out of memory allocating %zu bytes", size);
    if (align == HUGE_PAGE) (void)madvise(p, rounded, MADV_HUGEPAGE); /* a hint: failure is fine */
    return p;
}

void *xcalloc(size_t count, size_t size) {
    if (size != 0 && count > SIZE_MAX / size)
        infmoe_die("allocation of %zu x %zu bytes overflows", count, size);
    void *p = xmalloc(count * size);
    par_zero(p, count * size); /* the first touch, on every thread */
    return p;
}

void *xrealloc(void *p, size_t size) {
    void *q = realloc(p, size ? size : 1);
    if (!q) infmoe_die("out of memory reallocating to %zu bytes", size);
    return q;
}

char *xstrdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = xrealloc(NULL, n);
    memcpy(d, s, n);
    return d;
}

double wall_time(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Below this, one thread: waking the others costs more than the bytes. */
#define PAR_BYTES_MIN (256 * 1024)

/* Thread t of nt's share of [0, bytes), cut at multiples of 4 KiB from the start (whole
 * pages where the buffer starts on one: the large buffers start on 2 MiB). */
static void par_range(size_t bytes, int t, int nt, size_t *b0, size_t *b1) {
    size_t per = ((bytes + (size_t)nt - 1) / (size_t)nt + 4095) & ~(size_t)4095; /* nt x per >= bytes */
    *b0 = per * (size_t)t < bytes ? per * (size_t)t : bytes;
    *b1 = *b0 + per < bytes ? *b0 + per : bytes;
}

/* dst = src (no overlap), or zeroes where src is NULL: one range per thread. */
static void par_bytes(void *dst, const void *src, size_t bytes) {
    if (bytes < PAR_BYTES_MIN || omp_in_parallel() || omp_get_max_threads() < 2) {
        if (src) memcpy(dst, src, bytes);
        else memset(dst, 0, bytes);
        return;
    }
#pragma omp parallel
    {
        size_t b0, b1;
        par_range(bytes, omp_get_thread_num(), omp_get_num_threads(), &b0, &b1);
        if (b1 > b0 && src) memcpy((char *)dst + b0, (const char *)src + b0, b1 - b0);
        else if (b1 > b0) memset((char *)dst + b0, 0, b1 - b0);
    }
}

void par_zero(void *p, size_t bytes) { par_bytes(p, NULL, bytes); }

void par_copy(void *dst, const void *src, size_t bytes) { par_bytes(dst, src, bytes); }

int open_regular_file(const char *path, const char **why) {
    /* O_NONBLOCK: opening a FIFO for reading must not wait for a writer; it has no
     * effect on the reads of a regular file */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        *why = strerror(errno);
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) *why = strerror(errno);
    else if (S_ISDIR(st.st_mode)) *why = "it is a directory";
    else if (S_ISFIFO(st.st_mode)) *why = "it is a FIFO, not a regular file";
    else if (!S_ISREG(st.st_mode)) *why = "it is a device or socket, not a regular file";
    else return fd;
    close(fd);
    return -1;
}

char *read_text_file(const char *path, size_t *len, const char **why) {
    int fd = open_regular_file(path, why);
    if (fd < 0) return NULL;
    size_t cap = 4096, n = 0;
    char *buf = xrealloc(NULL, cap);
    for (;;) {
        ssize_t got = read(fd, buf + n, cap - n - 1);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) {
            *why = strerror(errno);
            close(fd);
            free(buf);
            return NULL;
        }
        if (got == 0) break;
        n += (size_t)got;
        if (n + 1 >= cap) buf = xrealloc(buf, cap *= 2);
    }
    close(fd);
    buf[n] = '\0';
    if (len) *len = n;
    return buf;
}

int parse_int_arg(const char *name, const char *s, int64_t min, int64_t max, int64_t *out,
                  char *err, size_t cap) {
    char *end;
    errno = 0;
    long long v = *s && !isspace((unsigned char)*s) ? strtoll(s, &end, 10) : 0;
    if (!*s || isspace((unsigned char)*s) || errno || *end || v < min || v > max) {
        snprintf(err, cap, "%s %s: expected an integer in [%lld, %lld]", name, s, (long long)min,
                 (long long)max);
        return -1;
    }
    *out = v;
    return 0;
}

int parse_float_arg(const char *name, const char *s, double min, double max, double *out,
                    char *err, size_t cap) {
    char *end;
    errno = 0;
    double v = *s && !isspace((unsigned char)*s) ? strtod(s, &end) : NAN;
    if (!*s || isspace((unsigned char)*s) || errno || *end || !isfinite(v) || v < min || v > max) {
        snprintf(err, cap, "%s %s: expected a number in [%g, %g]", name, s, min, max);
        return -1;
    }
    *out = v;
    return 0;
}

uint64_t rng_mix64(uint64_t z) {
    z += RNG_KEY_STRIDE;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = rng_mix64(*x);
    *x += RNG_KEY_STRIDE;
    return z;
}

uint64_t rng_token_key(uint64_t seed, int layer, int step, int purpose, int64_t token) {
    return rng_mix64(rng_mix64(rng_mix64(rng_mix64(seed) ^ (uint64_t)layer * 0x100000001b3ULL) ^
                               ((uint64_t)step * 31 + (uint64_t)purpose)) ^
                     (uint64_t)token);
}

float rng_key_uniform(uint64_t key) { return (float)(rng_mix64(key) >> 40) * (1.0f / 16777216.0f); }

float rng_key_normal(uint64_t key) {
    double u1 = ((double)(rng_mix64(key) >> 11) + 1.0) * (1.0 / 9007199254740992.0);
    double u2 = (double)(rng_mix64(key ^ 0x5851f42d4c957f2dULL) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* Acklam's rational approximation (relative error 1.2e-9) and one Halley step on
 * erfc, which brings it to double precision. */
double normal_quantile(double p) {
    static const double a[] = {-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
                               1.383577518672690e+02,  -3.066479806614716e+01, 2.506628277459239e+00};
    static const double b[] = {-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
                               6.680131188771972e+01,  -1.328068155288572e+01};
    static const double c[] = {-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
                               -2.549732539343734e+00, 4.374664141464968e+00,  2.938163982698783e+00};
    static const double d[] = {7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
                               3.754408661907416e+00};
    const double lo = 0.02425;
    double x;
    if (p < lo) {
        double q = sqrt(-2.0 * log(p));
        x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
            ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1.0);
    } else if (p <= 1.0 - lo) {
        double q = p - 0.5, r = q * q;
        x = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
            (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1.0);
    } else {
        double q = sqrt(-2.0 * log1p(-p));
        x = -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
            ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1.0);
    }
    double e = 0.5 * erfc(-x / sqrt(2.0)) - p;
    double u = e * sqrt(2.0 * 3.141592653589793) * exp(x * x / 2.0);
    return x - u / (1.0 + x * u / 2.0);
}

float rng_key_normal_stratum(uint64_t key, int k, int K) {
    double u = ((double)(rng_mix64(key) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
    return (float)normal_quantile(((double)k + u) / (double)K);
}

void *mem_carve(const mem_part *parts, size_t n) {
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (parts[i].bytes > SIZE_MAX / 4 || total > SIZE_MAX / 4)
            infmoe_die("allocation of %zu + %zu bytes overflows", total, parts[i].bytes);
        total += (parts[i].bytes + 63) / 64 * 64;
    }
    char *base = xcalloc(total ? total : 1, 1), *cur = base;
    for (size_t i = 0; i < n; i++) {
        *parts[i].ptr = cur;
        cur += (parts[i].bytes + 63) / 64 * 64;
    }
    return base;
}

void rng_seed(rng_state *r, uint64_t seed) {
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&x);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t rng_u64(rng_state *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

float rng_uniform(rng_state *r) { return (float)(rng_u64(r) >> 40) * (1.0f / 16777216.0f); }

float rng_normal(rng_state *r) {
    /* u1 in (0,1] so the log is finite. */
    double u1 = ((double)(rng_u64(r) >> 11) + 1.0) * (1.0 / 9007199254740992.0);
    double u2 = (double)(rng_u64(r) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

int mkdir_p(const char *path) {
    char buf[4096];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) {
        errno = ENAMETOOLONG;
        return -1;
    }
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST) return -1;
        *p = '/';
    }
    if (mkdir(buf, 0755) != 0 && errno != EEXIST) return -1;
    return 0;
}
