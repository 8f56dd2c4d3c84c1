/*
 * util: the few helpers every module needs: fatal errors that name where they
 * happened, checked allocation, a wall clock, and the project's random numbers.
 *
 * Errors: infmoe_die() prints "infmoe: <message>" (prefixed with the MPI rank once
 * dist has set it) and ends the whole job. User-facing messages say what was
 * wrong and what is expected; internal failures add the source file and line.
 */
#ifndef INFMOE_UTIL_H
#define INFMOE_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* Set by dist once MPI is up: the rank printed before messages (-1: none yet). */
extern int infmoe_rank_for_messages;
/* Set by dist: called by infmoe_die to end every rank (MPI_Abort); NULL before MPI. */
extern void (*infmoe_abort_hook)(int status);
/* Set by dist: ends this rank cleanly (MPI_Finalize) before exit; NULL before MPI. */
extern void (*infmoe_exit_hook)(void);
/* Set by dist: nonzero on ranks other than 0, which stay silent in infmoe_die_all. */
extern int infmoe_quiet_rank;

/* Print "infmoe: <fmt>" (with "[rank N]" when known) to stderr and end the job. */
void infmoe_die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
/*
 * An error every rank meets identically (a bad config, flag or data file): rank
 * 0 prints "infmoe: <fmt>", every rank finalises MPI and exits with status 1, so
 * the user sees one message and no abort banner.
 */
void infmoe_die_all(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
/* Exit with `status` after finalising MPI if it is up (the end of infmoe_die_all). */
void infmoe_exit(int status) __attribute__((noreturn));
/* Internal failure: as infmoe_die, plus the source location. */
void infmoe_fail_at(const char *file, int line, const char *fmt, ...)
    __attribute__((noreturn, format(printf, 3, 4)));

#define INFMOE_FAIL(...) infmoe_fail_at(__FILE__, __LINE__, __VA_ARGS__)
/* A condition the code relies on; failing it is a bug, never user error. */
#define ALWAYS(cond)                                                          \
    do {                                                                      \
        if (!(cond)) INFMOE_FAIL("internal error: expected %s", #cond);       \
    } while (0)

/* 64-byte aligned (8 MiB or more: 2 MiB aligned, on transparent huge pages where
 * the kernel grants them), zeroed allocation; dies with the size on failure. */
void *xcalloc(size_t count, size_t size);
void *xmalloc(size_t size);
void *xrealloc(void *p, size_t size);
char *xstrdup(const char *s);

/*
 * memset(p, 0, bytes) and memcpy (no overlap) on every OpenMP thread, each a
 * range of whole 4 KiB multiples: the step's large buffers (gradients, residuals, activation
 * gradients) zeroed or copied by one thread leave the others idle, a share of the
 * step that grows with the thread count. Below 256 KiB, or called inside a
 * parallel region, plain memset / memcpy. The bytes written are the same.
 */
void par_zero(void *p, size_t bytes);
void par_copy(void *dst, const void *src, size_t bytes);

/* Seconds on a monotonic clock. */
double wall_time(void);

/*
 * Open `path` read-only if it is a regular file: the descriptor, or -1 with *why
 * saying why not ("it is a directory", "it is a FIFO, not a regular file", or
 * strerror). A FIFO is refused at once instead of blocking until a writer comes.
 */
int open_regular_file(const char *path, const char **why);

/* Read a whole regular file into a NUL-terminated buffer (*len: its bytes, NULs
 * included); NULL with *why set as open_regular_file does on failure. */
char *read_text_file(const char *path, size_t *len, const char **why);

/*
 * Strict numbers for command-line flags: all of `s` is one decimal integer (or
 * one finite number) within [min, max]. 0, or -1 with err set to
 * "NAME S: expected an integer in [MIN, MAX]" (or "a number in").
 */
int parse_int_arg(const char *name, const char *s, int64_t min, int64_t max, int64_t *out,
                  char *err, size_t cap);
int parse_float_arg(const char *name, const char *s, double min, double max, double *out,
                    char *err, size_t cap);

/* mkdir -p: 0, or -1 with errno set. */
int mkdir_p(const char *path);

/*
 * Random numbers: a SplitMix64-seeded xoshiro256** stream. Every rank that
 * seeds the same stream draws the same numbers, which is how parameters are
 * initialised identically everywhere without a broadcast.
 */
typedef struct {
    uint64_t s[4];
} rng_state;

void rng_seed(rng_state *r, uint64_t seed);
uint64_t rng_u64(rng_state *r);
/* Uniform in [0, 1) with 24 random bits. */
float rng_uniform(rng_state *r);
/* Standard normal (Box-Muller, one value per call). */
float rng_normal(rng_state *r);

/*
 * Counter-based draws: a value is a pure function of a 64-bit key, so a draw
 * for a global token is the same whichever rank routes the token, which is
 * what makes runs on any rank count equal (noise, jitter, ∞-MoE samples).
 * rng_token_key(seed, layer, step, purpose, token) names one token's draws;
 * the i-th value of that token is drawn from key + i * RNG_KEY_STRIDE.
 */
#define RNG_KEY_STRIDE 0x9e3779b97f4a7c15ULL
/* SplitMix64's output function (the constant added, then two multiply-xorshifts). */
uint64_t rng_mix64(uint64_t x);
uint64_t rng_token_key(uint64_t seed, int layer, int step, int purpose, int64_t token);
/* Uniform in [0, 1) with 24 bits, and a standard normal (Box-Muller), from a key. */
float rng_key_uniform(uint64_t key);
float rng_key_normal(uint64_t key);
/* A standard normal restricted to stratum k of K equal-probability strata: the
 * quantile at (k + u) / K, u uniform in (0, 1) from the key. Over k = 0..K-1 the K
 * draws are an unbiased stratified sample of N(0, 1). */
float rng_key_normal_stratum(uint64_t key, int k, int K);
/* The standard normal quantile (inverse CDF) at p in (0, 1), to ~1e-15 relative. */
double normal_quantile(double p);

/*
 * One allocation for many buffers (a size table): each part names the pointer
 * to set and its size in bytes; mem_carve allocates the sum (zeroed, every part
 * 64-byte aligned), points each part into it and returns the block, which is
 * freed with free(). A module lists its buffers once and frees one pointer.
 */
typedef struct {
    void **ptr;
    size_t bytes;
} mem_part;
void *mem_carve(const mem_part *parts, size_t n);
#define MEM_PART(p, count) {(void **)&(p), (size_t)(count) * sizeof *(p)}

#endif
