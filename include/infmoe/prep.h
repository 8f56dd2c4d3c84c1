/*
 * prep: `infmoe prep`, text files -> token shards DIR/train.bin and DIR/val.bin
 * (the last val_fraction of the tokens), llm.c's format with the tokenizer in
 * header[3]. Byte-level (vocabulary 256) or GPT-2's BPE (bpe.h; each file a
 * document that starts with <|endoftext|>). Files are read in pieces of about
 * 1 MiB cut where encoding them apart changes nothing (bpe_safe_cut), a batch
 * of pieces is encoded in parallel, and tokens are appended in order, so the
 * shards do not depend on the thread count and memory stays small. Shards are
 * written under .tmp names and renamed at the end.
 */
#ifndef INFMOE_PREP_H
#define INFMOE_PREP_H

int prep_main(int argc, char **argv);

#endif
