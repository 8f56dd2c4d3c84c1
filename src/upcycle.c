/* upcycle: a step-0 MoE or ∞-MoE checkpoint from a dense model (see upcycle.h, docs/moe.md). */
#include "infmoe/upcycle.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/ckpt.h"
#include "infmoe/config.h"
#include "infmoe/dist.h"
#include "infmoe/model.h"
#include "infmoe/rundir.h"
#include "infmoe/util.h"

int64_t upcycle_source_unit(int64_t slot, int64_t width, int64_t i, int64_t hidden) {
    return (slot * width + i) % hidden;
}

static void upcycle_usage(FILE *f) {
    fprintf(f,
            "usage: infmoe upcycle SRC --config MOE.yaml --out DIR [--set section.key=value ...]\n"
            "\n"
            "Writes DIR/step_000000: the model MOE.yaml describes (ffn.kind topk, moge or\n"
            "infinite; dense too, to import llm.c weights), with the embeddings, attention,\n"
            "LayerNorms and dense FFN layers of the dense model SRC, and experts, ∞-MoE units\n"
            "and a shared FFN made from SRC's FFN of the same layer; routers are initialised\n"
            "as for training from scratch. SRC is an infmoe checkpoint of a dense model (a\n"
            "step_NNNNNN directory or a run's 'latest') or an llm.c GPT-2 checkpoint\n"
            "(gpt2_124M.bin: magic 20240326, version 3, fp32). model.* of MOE.yaml must\n"
            "match SRC (seq_len may be shorter: the first rows of the position table).\n"
            "\n"
            "Rule (docs/moe.md, Upcycling): unit i of expert e is dense unit (e We + i) mod\n"
            "H; its output weights are scaled by H / We (and by 1/2 each when a shared FFN\n"
            "takes the other half). With noisy gates, expert_hidden a multiple of H and no\n"
            "drops, the upcycled layer computes the dense layer's function.\n"
            "Train on with: infmoe train MOE.yaml --resume DIR/step_000000\n"
            "Runs as one process (the checkpoint loads at any rank count).\n");
}

/* ---- the dense source ---- */

/* The source's config: the target's with a dense FFN of `hidden` units. */
static void dense_config(run_config *src, const run_config *tgt, int hidden, int seq_len) {
    *src = *tgt;
    src->text = NULL;
    src->ffn_kind = FFN_DENSE;
    src->ffn_hidden = hidden;
    src->shared_hidden = 0;
    src->expert_bias_rate = 0;
    src->force_balance = 0;
    src->seq_len = seq_len;
    src->ep = 1;
}

static int is_llmc(const char *path, int32_t *header) {
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    size_t got = fread(header, sizeof(int32_t), 256, f);
    fclose(f);
    return got == 256 && header[0] == LLMC_MAGIC;
}

/* Copy `rows` rows of `cols` floats from the file into tensor `name` of m (layer l or -1). */
static void llmc_read(FILE *f, const char *path, gpt_model *m, const char *fmt, int layer, int64_t rows,
                      int64_t cols) {
    char name[96];
    snprintf(name, sizeof name, fmt, layer);
    const tensor_spec *s = tensor_find(&m->tensors, name);
    ALWAYS(s != NULL);
    float *dst = m->params + s->offset;
    int64_t keep = (int64_t)(s->numel / (size_t)cols);
    if (keep > rows) keep = rows;
    if (fread(dst, sizeof(float), (size_t)(keep * cols), f) != (size_t)(keep * cols) ||
        fseek(f, (long)((rows - keep) * cols * (int64_t)sizeof(float)), SEEK_CUR) != 0)
        infmoe_die_all("upcycle: %s: the file ends inside tensor %s (truncated?)", path, name);
}

/*
 * llm.c's layout: wte (Vp, C), wpe (maxT, C), then per tensor kind all layers:
 * ln1w, ln1b (L, C), qkvw (L, 3C, C), qkvb (L, 3C), attprojw (L, C, C), attprojb,
 * ln2w, ln2b (L, C), fcw (L, 4C, C), fcb (L, 4C), fcprojw (L, C, 4C), fcprojb
 * (L, C), lnfw, lnfb (C).
 */
static void load_llmc(const char *path, const int32_t *h, const run_config *tgt, run_config *src_cfg,
                      gpt_model *src, const dist_ctx *d) {
    const int maxT = h[2], V = h[3], L = h[4], NH = h[5], C = h[6], Vp = h[7];
    if (h[1] != LLMC_VERSION_FP32)
        infmoe_die_all("upcycle: %s: llm.c checkpoint version %d; only version %d (fp32 weights) is read "
                       "(llm.c's bf16 files are version 5)", path, h[1], LLMC_VERSION_FP32);
    if (L < 1 || C < 1 || NH < 1 || V < 1 || Vp < V || maxT < 1)
        infmoe_die_all("upcycle: %s: implausible llm.c header (L %d, C %d, NH %d, V %d, Vp %d, maxT %d)",
                       path, L, C, NH, V, Vp, maxT);
    if (L != tgt->n_layer || C != tgt->n_embd || NH != tgt->n_head || V != tgt->vocab_size ||
        maxT < tgt->seq_len)
        infmoe_die_all("upcycle: %s is L%d C%d NH%d V%d T%d; the config asks for L%d C%d NH%d V%d T%d "
                       "(model.* must match; seq_len may be shorter)",
                       path, L, C, NH, V, maxT, tgt->n_layer, tgt->n_embd, tgt->n_head, tgt->vocab_size,
                       tgt->seq_len);
    dense_config(src_cfg, tgt, 4 * C, tgt->seq_len);
    model_build(src, src_cfg, 1, d);
    FILE *f = fopen(path, "rb");
    if (!f || fseek(f, 256 * sizeof(int32_t), SEEK_SET) != 0)
        infmoe_die_all("upcycle: %s: cannot read: %s", path, strerror(errno));
    const tensor_spec *wte = tensor_find(&src->tensors, "wte");
    memset(src->params + wte->offset, 0, wte->numel * sizeof(float)); /* padding rows: 0 */
    llmc_read(f, path, src, "wte", -1, Vp, C);
    llmc_read(f, path, src, "wpe", -1, maxT, C);
    struct {
        const char *fmt;
        int64_t rows, cols;
    } per_layer[] = {
        {"h.%d.ln1.w", 1, C},          {"h.%d.ln1.b", 1, C},      {"h.%d.attn.qkv.w", 3 * C, C},
        {"h.%d.attn.qkv.b", 1, 3 * C}, {"h.%d.attn.proj.w", C, C}, {"h.%d.attn.proj.b", 1, C},
        {"h.%d.ln2.w", 1, C},          {"h.%d.ln2.b", 1, C},      {"h.%d.ffn.fc.w", 4 * C, C},
        {"h.%d.ffn.fc.b", 1, 4 * C},   {"h.%d.ffn.proj.w", C, 4 * C}, {"h.%d.ffn.proj.b", 1, C},
    };
    for (size_t k = 0; k < sizeof per_layer / sizeof per_layer[0]; k++)
        for (int l = 0; l < L; l++) llmc_read(f, path, src, per_layer[k].fmt, l, per_layer[k].rows, per_layer[k].cols);
    llmc_read(f, path, src, "lnf.w", -1, 1, C);
    llmc_read(f, path, src, "lnf.b", -1, 1, C);
    int extra = fgetc(f) != EOF;
    fclose(f);
    if (extra) infmoe_die_all("upcycle: %s: bytes after the last tensor (lnf.b): not an llm.c GPT-2 checkpoint of this header", path);
}

static void load_infmoe(const char *arg, const run_config *tgt, run_config *src_cfg, gpt_model *src,
                        const dist_ctx *d, char *path, size_t cap) {
    ckpt_resolve(arg, ".", path, cap);
    char *text = ckpt_config_text(path);
    char *sets[1] = {"parallel.ep=1"};
    run_config saved;
    config_load_text(&saved, path, text, 1, sets, 0);
    free(text);
    if (saved.ffn_kind != FFN_DENSE)
        infmoe_die_all("upcycle: %s is a %s model; upcycling starts from a dense one (ffn.kind: dense)", path,
                       ffn_kind_name(saved.ffn_kind));
    if (saved.n_layer != tgt->n_layer || saved.n_embd != tgt->n_embd || saved.n_head != tgt->n_head ||
        saved.vocab_size != tgt->vocab_size || saved.seq_len < tgt->seq_len)
        infmoe_die_all("upcycle: %s is L%d C%d NH%d V%d T%d; the config asks for L%d C%d NH%d V%d T%d "
                       "(model.* must match; seq_len may be shorter)",
                       path, saved.n_layer, saved.n_embd, saved.n_head, saved.vocab_size, saved.seq_len,
                       tgt->n_layer, tgt->n_embd, tgt->n_head, tgt->vocab_size, tgt->seq_len);
    dense_config(src_cfg, tgt, saved.ffn_hidden, saved.seq_len);
    config_free(&saved);
    model_build(src, src_cfg, 1, d);
    ckpt_load(path, src, src_cfg, d);
}

/* ---- the rules ---- */

static const tensor_spec *need(const gpt_model *m, const char *fmt, int layer) {
    char name[96];
    snprintf(name, sizeof name, fmt, layer);
    const tensor_spec *s = tensor_find(&m->tensors, name);
    ALWAYS(s != NULL);
    return s;
}

/* The dense FFN of layer l of the source: fc.w [H, C], fc.b [H], proj.w [C, H], proj.b [C]. */
typedef struct {
    const float *fc_w, *fc_b, *proj_w, *proj_b;
    int64_t H, C;
} dense_src;

static dense_src source_ffn(const gpt_model *src, int l) {
    const tensor_spec *fw = need(src, "h.%d.ffn.fc.w", l);
    return (dense_src){src->params + fw->offset, src->params + need(src, "h.%d.ffn.fc.b", l)->offset,
                       src->params + need(src, "h.%d.ffn.proj.w", l)->offset,
                       src->params + need(src, "h.%d.ffn.proj.b", l)->offset, fw->shape[0], fw->shape[1]};
}

/*
 * `slots` FFNs of `width` units (experts, or 1 for a shared FFN or the ∞-MoE units)
 * from the dense one: input rows copied, output weights times `scale`, output bias
 * times alpha. proj_unit_major: the output weights are [width, C] (∞-MoE) instead
 * of [C, width].
 */
static void fill_from_dense(const dense_src *s, int64_t slots, int64_t width, float scale, float alpha,
                            float *fc_w, float *fc_b, float *proj_w, int proj_unit_major, float *proj_b) {
    const int64_t C = s->C, H = s->H;
    for (int64_t e = 0; e < slots; e++) {
        for (int64_t i = 0; i < width; i++) {
            int64_t j = upcycle_source_unit(e, width, i, H);
            memcpy(fc_w + (e * width + i) * C, s->fc_w + j * C, sizeof(float) * (size_t)C);
            fc_b[e * width + i] = s->fc_b[j];
            for (int64_t c = 0; c < C; c++) {
                float w = scale * s->proj_w[c * H + j];
                if (proj_unit_major) proj_w[(e * width + i) * C + c] = w;
                else proj_w[e * C * width + c * width + i] = w;
            }
        }
        if (proj_b)
            for (int64_t c = 0; c < C; c++) proj_b[e * C + c] = alpha * s->proj_b[c];
    }
}

int upcycle_main(int argc, char **argv) {
    const char *src_arg = NULL, *config = NULL, *out = NULL;
    char **sets = xcalloc((size_t)argc + 1, sizeof(char *));
    int n_sets = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            upcycle_usage(stdout);
            free(sets);
            return 0;
        }
        if (strcmp(argv[i], "--config") == 0 || strcmp(argv[i], "--out") == 0 || strcmp(argv[i], "--set") == 0) {
            if (i + 1 >= argc) {
                fprintf(stderr, "infmoe upcycle: %s needs a value (see infmoe upcycle --help)\n", argv[i]);
                return 1;
            }
            if (argv[i][2] == 'c') config = argv[++i];
            else if (argv[i][2] == 'o') out = argv[++i];
            else sets[n_sets++] = argv[++i];
        } else if (argv[i][0] == '-') {
            fprintf(stderr, "infmoe upcycle: unknown option '%s' (see infmoe upcycle --help)\n", argv[i]);
            return 1;
        } else if (!src_arg) {
            src_arg = argv[i];
        } else {
            fprintf(stderr, "infmoe upcycle: more than one source given ('%s' and '%s')\n", src_arg, argv[i]);
            return 1;
        }
    }
    if (!src_arg || !config || !out) {
        fprintf(stderr, "infmoe upcycle: needs SRC, --config MOE.yaml and --out DIR (see infmoe upcycle --help)\n");
        return 1;
    }
    dist_ctx d;
    dist_init(&d, &argc, &argv);
    if (d.size != 1) infmoe_die_all("upcycle: run it as one process, without mpirun (the checkpoint it writes loads at any rank count)");
    /* the target: this config on one rank, written into --out */
    char set_ep[] = "parallel.ep=1", set_out[1100];
    snprintf(set_out, sizeof set_out, "output.dir=%.1000s", out);
    sets[n_sets++] = set_ep;
    sets[n_sets++] = set_out;
    run_config cfg;
    config_load(&cfg, config, n_sets, sets, 0);
    dist_set_layout(&d, 1);
    gpt_model tgt, src;
    run_config src_cfg;
    int32_t header[256];
    char src_path[2048];
    snprintf(src_path, sizeof src_path, "%s", src_arg);
    int llmc = is_llmc(src_arg, header);
    /* read the source before anything is written */
    if (llmc) load_llmc(src_arg, header, &cfg, &src_cfg, &src, &d);
    else load_infmoe(src_arg, &cfg, &src_cfg, &src, &d, src_path, sizeof src_path);
    model_build(&tgt, &cfg, 1, &d);
    model_init_params(&tgt, (uint64_t)cfg.seed);

    /* 1. every tensor the source has under the same name and shape (wpe: its first rows) */
    int copied = 0, made = 0, fresh = 0;
    for (int t = 0; t < tgt.tensors.n; t++) {
        const tensor_spec *ts = &tgt.tensors.t[t];
        const tensor_spec *ss = tensor_find(&src.tensors, ts->name);
        if (!ss) continue;
        int same = ss->ndim == ts->ndim;
        for (int k = 1; k < ts->ndim && same; k++) same = ss->shape[k] == ts->shape[k];
        if (!same || ss->shape[0] < ts->shape[0])
            infmoe_die_all("upcycle: tensor %s is [%lld, ...] in %s but [%lld, ...] in the config%s", ts->name,
                           (long long)ss->shape[0], src_path, (long long)ts->shape[0],
                           strstr(ts->name, ".ffn.") ? " (dense layers keep ffn.hidden of the source)" : "");
        memcpy(tgt.params + ts->offset, src.params + ss->offset, ts->numel * sizeof(float));
        copied++;
    }
    /* 2. routed layers: experts, units and the shared FFN from the source's FFN */
    int identical = 1;
    const char *why = "";
    for (int l = 0; l < tgt.L; l++) {
        const ffn_layer *f = &tgt.ffn[l];
        if (f->kind == FFN_DENSE) continue;
        dense_src s = source_ffn(&src, l);
        const float alpha = cfg.shared_hidden > 0 ? 0.5f : 1.0f;
        if (cfg.shared_hidden > 0) {
            fill_from_dense(&s, 1, cfg.shared_hidden, alpha * (float)s.H / (float)cfg.shared_hidden, alpha, tgt.params + need(&tgt, "h.%d.ffn.shared.fc.w", l)->offset,
                            tgt.params + need(&tgt, "h.%d.ffn.shared.fc.b", l)->offset,
                            tgt.params + need(&tgt, "h.%d.ffn.shared.proj.w", l)->offset, 0,
                            tgt.params + need(&tgt, "h.%d.ffn.shared.proj.b", l)->offset);
            made += 4;
            if (cfg.shared_hidden % s.H) identical = 0, why = "ffn.shared_hidden is not a multiple of the dense width";
        }
        if (f->kind == FFN_INFINITE) {
            int nb = cfg.inf_units / cfg.mask_block, kb = (int)lround(cfg.keep * nb);
            int64_t n_keep = (int64_t)(kb < 1 ? 1 : kb) * cfg.mask_block;
            /* a sample's kept units carry weights of mean 1 (docs/infinite.md): scale by H / n_keep */
            fill_from_dense(&s, 1, cfg.inf_units, alpha * (float)s.H / (float)n_keep, alpha,
                            tgt.params + need(&tgt, "h.%d.inf.ffn.fc.w", l)->offset,
                            tgt.params + need(&tgt, "h.%d.inf.ffn.fc.b", l)->offset,
                            tgt.params + need(&tgt, "h.%d.inf.ffn.proj.w", l)->offset, 1,
                            tgt.params + need(&tgt, "h.%d.inf.ffn.proj.b", l)->offset);
            made += 4;
            identical = 0, why = "an ∞-MoE sample keeps a weighted arc of units, not the whole FFN";
        } else {
            fill_from_dense(&s, cfg.experts, cfg.expert_hidden, alpha * (float)s.H / (float)cfg.expert_hidden, alpha,
                            tgt.params + need(&tgt, "h.%d.moe.experts.fc.w", l)->offset,
                            tgt.params + need(&tgt, "h.%d.moe.experts.fc.b", l)->offset,
                            tgt.params + need(&tgt, "h.%d.moe.experts.proj.w", l)->offset, 0,
                            tgt.params + need(&tgt, "h.%d.moe.experts.proj.b", l)->offset);
            made += 4;
            if (cfg.expert_hidden % s.H) identical = 0, why = "ffn.expert_hidden is not a multiple of the dense width (experts are slices)";
            else if (cfg.gate == GATE_SWITCH) identical = 0, why = "Switch gates are router probabilities, which do not sum to 1";
            else if (cfg.capacity_factor > 0 || cfg.eval_capacity_factor > 0) identical = 0, why = "a capacity factor may drop tokens";
        }
    }
    for (int t = 0; t < tgt.tensors.n; t++) fresh += !tensor_find(&src.tensors, tgt.tensors.t[t].name);
    fresh -= made;

    run_dir dir;
    rundir_open(&dir, cfg.output_dir, &d);
    ckpt_save(&dir, &tgt, &cfg, &d, (ckpt_position){0, 0}, 0);
    rundir_close(&dir);
    printf("upcycle %s (%s) -> %s/step_000000 | %s, %d layers | %d tensors copied, %d made from the dense FFN, "
           "%d initialised (routers) | %s\n",
           src_path, llmc ? "llm.c" : "infmoe", cfg.output_dir, ffn_kind_name(cfg.ffn_kind), cfg.n_layer, copied,
           made, fresh,
           identical ? "the same function as the dense model at step 0"
                     : "not the dense model's function at step 0");
    if (!identical) printf("  (%s)\n", why);
    printf("train on with: infmoe train %s --resume %s/step_000000\n", config, cfg.output_dir);
    model_free(&tgt);
    model_free(&src);
    config_free(&cfg);
    free(sets);
    dist_finalize(&d);
    return 0;
}
