/*
 * tool_llmc: writes an infmoe dense checkpoint as an llm.c GPT-2 checkpoint, for
 * the upcycling tests (llm.c's layout: include/infmoe/upcycle.h, docs/formats.md).
 *   tool_llmc CKPT OUT.bin [VERSION]
 * The file is padded as llm.c pads it: the vocabulary to a multiple of 128 and
 * the position table to 2 x seq_len rows, the extra rows filled with 7.0 so a
 * reader that takes them shows it. VERSION (default 3) is written as given.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/ckpt.h"
#include "infmoe/config.h"
#include "infmoe/dist.h"
#include "infmoe/model.h"
#include "infmoe/upcycle.h"
#include "infmoe/util.h"

static void put(FILE *f, const gpt_model *m, const char *fmt, int layer, int64_t rows_file) {
    char name[96];
    snprintf(name, sizeof name, fmt, layer);
    const tensor_spec *s = tensor_find(&m->tensors, name);
    if (!s) {
        fprintf(stderr, "tool_llmc: no tensor %s (a dense model?)\n", name);
        exit(1);
    }
    int64_t cols = s->ndim == 2 ? s->shape[1] : s->shape[0], rows = s->ndim == 2 ? s->shape[0] : 1;
    fwrite(m->params + s->offset, sizeof(float), (size_t)(rows * cols), f);
    for (int64_t i = rows * cols; i < rows_file * cols; i++) {
        float junk = 7.0f;
        fwrite(&junk, sizeof junk, 1, f);
    }
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: tool_llmc CKPT OUT.bin [VERSION]\n");
        return 1;
    }
    dist_ctx d;
    dist_init(&d, &argc, &argv);
    char path[2048];
    ckpt_resolve(argv[1], ".", path, sizeof path);
    char *text = ckpt_config_text(path);
    run_config cfg;
    char *sets[1] = {"parallel.ep=1"};
    config_load_text(&cfg, path, text, 1, sets, 0);
    free(text);
    dist_set_layout(&d, 1);
    gpt_model m;
    model_build(&m, &cfg, 1, &d);
    ckpt_load(path, &m, &cfg, &d);
    const int L = cfg.n_layer, C = cfg.n_embd, V = cfg.vocab_size, T = cfg.seq_len;
    const int Vp = (V + 127) / 128 * 128 + 128, maxT = 2 * T; /* padding always present */
    int32_t h[256] = {0};
    h[0] = LLMC_MAGIC;
    h[1] = argc > 3 ? atoi(argv[3]) : LLMC_VERSION_FP32;
    h[2] = maxT;
    h[3] = V;
    h[4] = L;
    h[5] = cfg.n_head;
    h[6] = C;
    h[7] = Vp;
    FILE *f = fopen(argv[2], "wb");
    if (!f) {
        perror(argv[2]);
        return 1;
    }
    fwrite(h, sizeof h[0], 256, f);
    /* infmoe's own padding rows past V are not llm.c's: write V rows, then junk */
    const tensor_spec *wte = tensor_find(&m.tensors, "wte");
    fwrite(m.params + wte->offset, sizeof(float), (size_t)V * C, f);
    for (int64_t i = (int64_t)V * C; i < (int64_t)Vp * C; i++) {
        float junk = 7.0f;
        fwrite(&junk, sizeof junk, 1, f);
    }
    put(f, &m, "wpe", -1, maxT);
    const char *per_layer[] = {"h.%d.ln1.w",     "h.%d.ln1.b",       "h.%d.attn.qkv.w", "h.%d.attn.qkv.b",
                               "h.%d.attn.proj.w", "h.%d.attn.proj.b", "h.%d.ln2.w",      "h.%d.ln2.b",
                               "h.%d.ffn.fc.w",  "h.%d.ffn.fc.b",    "h.%d.ffn.proj.w", "h.%d.ffn.proj.b"};
    for (size_t k = 0; k < sizeof per_layer / sizeof per_layer[0]; k++)
        for (int l = 0; l < L; l++) put(f, &m, per_layer[k], l, 0);
    put(f, &m, "lnf.w", -1, 0);
    put(f, &m, "lnf.b", -1, 0);
    fclose(f);
    model_free(&m);
    config_free(&cfg);
    dist_finalize(&d);
    return 0;
}
