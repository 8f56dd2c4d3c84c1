/*
 * upcycle: `infmoe upcycle SRC --config MOE.yaml --out DIR` writes a step-0
 * checkpoint of the model MOE.yaml describes whose attention, embeddings and
 * LayerNorms are those of the dense model SRC and whose experts, ∞-MoE units and
 * shared FFN are made from SRC's FFNs (Komatsuzaki et al., "Sparse Upcycling").
 * SRC is an infmoe checkpoint of a dense model, or an llm.c GPT-2 checkpoint
 * (gpt2_124M.bin: header magic 20240326, version 3, fp32 weights). Rules and
 * where they keep the function: docs/moe.md, "Upcycling".
 */
#ifndef INFMOE_UPCYCLE_H
#define INFMOE_UPCYCLE_H

#include <stdint.h>

/* llm.c's GPT-2 checkpoint header: 256 int32, then the fp32 (version 3) parameters. */
#define LLMC_MAGIC 20240326
#define LLMC_VERSION_FP32 3

int upcycle_main(int argc, char **argv);

/*
 * The dense unit that unit i of slot s (expert s, or 0 for a shared FFN or the
 * ∞-MoE units) of `width` units copies from a dense FFN of `hidden` units:
 * (s width + i) mod hidden.
 */
int64_t upcycle_source_unit(int64_t slot, int64_t width, int64_t i, int64_t hidden);

#endif
