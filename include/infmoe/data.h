/*
 * data: token shards in the llm.c format and the distributed sampler.
 *
 * A shard is a 256 x int32 header (magic 20240520, version 1, token count)
 * followed by that many uint16 tokens. Shards are validated on open and read
 * with pread, window by window. A dataset is one file or a glob of files (a path
 * that exists is taken as it is, glob characters and all); it is cut into windows of
 * seq_len + 1 tokens (inputs and shifted targets) starting every seq_len tokens.
 *
 * Sampling: global sequence g (= step * batch_size + i) lives in epoch
 * g / n_windows at position g % n_windows of that epoch's seeded shuffle, so
 * the sequences of a step do not depend on the rank count; rank r of P takes
 * the r-th slice of batch_size / P sequences.
 */
#ifndef INFMOE_DATA_H
#define INFMOE_DATA_H

#include <stddef.h>
#include <stdint.h>

#define SHARD_MAGIC 20240520
#define SHARD_VERSION 1
#define SHARD_HEADER_INTS 256
/* header[3]: the tokenizer that wrote the shard, tokenizer_kind + 1 (infmoe's
 * addition to the format; 0, as llm.c writes, means not recorded) */
#define SHARD_HEADER_TOKENIZER 3

typedef struct {
    int n_shards;
    char **paths;
    int *fds; /* open shards */
    size_t *n_tokens;
    int seq_len, vocab_size;
    uint16_t *window; /* seq_len + 1 tokens: the window being read */
    uint64_t n_windows;
    uint64_t *window_start; /* first global window of each shard (prefix sums) */
    /* shuffled order of the current epoch */
    uint64_t seed;
    int64_t perm_epoch;
    uint64_t *perm;
} token_dataset;

/*
 * Open `pattern` (a file, or else a glob), validate every shard (a regular file;
 * size, magic, version, tokens below vocab_size, a recorded tokenizer equal to
 * `tokenizer`, a tokenizer_kind) and index windows of seq_len + 1
 * tokens. Any problem is fatal with a message naming the file, and so is a shard
 * that shrinks or changes while batches are read from it.
 */
void data_open(token_dataset *ds, const char *pattern, int seq_len, int vocab_size,
               uint64_t seed, int tokenizer);
void data_close(token_dataset *ds);

/*
 * Fill inputs/targets (n_seq, seq_len) with global sequences first .. first+n_seq-1
 * of the shuffled stream (training).
 */
void data_train_batch(token_dataset *ds, uint64_t first, int n_seq, int32_t *inputs,
                      int32_t *targets);
/* Same for the unshuffled stream, wrapping around (evaluation). */
void data_eval_batch(token_dataset *ds, uint64_t first, int n_seq, int32_t *inputs,
                     int32_t *targets);

#endif
