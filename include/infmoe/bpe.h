/*
 * bpe: GPT-2's byte-level BPE tokeniser (encode and decode).
 *
 * The vocabulary comes from GPT-2's published files in one directory:
 * encoder.json (token string -> id, 50257 entries) and vocab.bpe (50000 merges,
 * highest priority first); scripts/fetch-gpt2-vocab.sh installs them in data/gpt2.
 * Loading checks them whole: every token a byte-level string (or <|endoftext|>),
 * ids dense from 0, every merge's parts and result in the vocabulary. A file that
 * fails gets one message naming the file, line or key.
 *
 * Encoding follows GPT-2: text is split into pieces by its pattern
 *     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * (PCRE2, Unicode properties; \s is Unicode White_Space, as in GPT-2's Python
 * encoder), each piece's UTF-8 bytes start as byte tokens, and adjacent pairs
 * merge in rank order until no ranked pair is left. Text that is not valid UTF-8
 * is handled byte by byte: the valid runs between invalid bytes are encoded as
 * above, and each invalid byte becomes its single-byte token, so
 * decode(encode(x)) == x for every byte string.
 *
 * A bpe_vocab is read-only once loaded and shared by threads; each thread
 * encodes with its own bpe_encoder (match state and a cache of pieces).
 */
#ifndef INFMOE_BPE_H
#define INFMOE_BPE_H

#include <stddef.h>
#include <stdint.h>

typedef struct bpe_vocab bpe_vocab;
typedef struct bpe_encoder bpe_encoder;

/* Growable token list. */
typedef struct {
    uint16_t *ids;
    size_t n, cap;
} bpe_tokens;

/* Load DIR/encoder.json and DIR/vocab.bpe; NULL with a one-line message in err. */
bpe_vocab *bpe_load(const char *dir, char *err, size_t errcap);
void bpe_free(bpe_vocab *v);
int bpe_vocab_size(const bpe_vocab *v);
/* Id of <|endoftext|>, or -1 when the vocabulary has none. */
int bpe_eot(const bpe_vocab *v);
/* The bytes token `id` stands for (the special token: its name). */
const char *bpe_token_bytes(const bpe_vocab *v, int id, size_t *len);

bpe_encoder *bpe_encoder_new(const bpe_vocab *v);
void bpe_encoder_free(bpe_encoder *e);
/* Append the tokens of text[0, len) to out. */
void bpe_encode(bpe_encoder *e, const char *text, size_t len, bpe_tokens *out);
void bpe_tokens_push(bpe_tokens *t, uint16_t id);
void bpe_tokens_free(bpe_tokens *t);

/*
 * The largest p in (0, len) such that encoding text[0, p) and text[p, len)
 * separately gives the tokens of text[0, len): a newline between two printable
 * ASCII characters, cut after the newline. 0 when there is none. Lets prep
 * encode a long file in independent pieces.
 */
size_t bpe_safe_cut(const char *text, size_t len);

#endif
