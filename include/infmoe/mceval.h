/*
 * mceval: multiple-choice evaluation files in llm.c's eval format (the one its
 * HellaSwag script writes and its evalloader reads), built from text, and scored.
 *
 * File: 256 x int32 header ([0] magic 20240522, [1] version 1, [2] items, [3] the
 * longest item in bytes), then each item as uint16 values: 65535, the item's
 * bytes (these five header values and all its tokens), its index, the label (the
 * right completion), the number of completions (4), the context length and
 * tokens, then each completion's length and tokens.
 *
 * Scoring, as llm.c does: each completion is appended to the context and the
 * model's loss summed over the completion's tokens; acc takes the completion of
 * the least summed loss, acc_norm of the least mean loss (first on ties).
 */
#ifndef INFMOE_MCEVAL_H
#define INFMOE_MCEVAL_H

#include <stddef.h>
#include <stdint.h>

#include "infmoe/dist.h"
#include "infmoe/model.h"

#define MC_MAGIC 20240522
#define MC_VERSION 1
#define MC_COMPLETIONS 4

typedef struct {
    int n;                   /* items */
    int *label;              /* [n] */
    size_t *ctx, *comp;      /* offsets into tok: [n] contexts, [n * 4] completions */
    int *ctx_len, *comp_len; /* [n], [n * 4] */
    uint16_t *tok;
    size_t n_tok, cap_tok;
} mc_set;

/* Read and check a file whole (any problem: -1 and one line in err). Tokens must be
 * below vocab_size. */
int mc_read(const char *path, int vocab_size, mc_set *s, char *err, size_t cap);
/* Write (under path.tmp, renamed): 0 or -1 with errno. */
int mc_write(const char *path, const mc_set *s);
/* Append an item. */
void mc_add(mc_set *s, int label, const uint16_t *ctx, int ctx_len, const uint16_t *const comp[MC_COMPLETIONS],
            const int comp_len[MC_COMPLETIONS]);
void mc_free(mc_set *s);

/*
 * Score the items with the model (B local rows a forward, a multiple of 4, on
 * every rank of d: rank r takes its B/4 items of each forward; ranks without
 * items left run padding so the collective layers keep in step). Routing draws
 * are keyed by (item, completion, position), so any rank count gives the same
 * result. A context too long for seq_len loses its first tokens. Returns the
 * counts of right answers over all ranks.
 */
void mc_evaluate(gpt_model *m, const mc_set *s, const dist_ctx *d, int step, int *correct, int *correct_norm);

#endif
