/* config: YAML run configs with a schema, overrides and validation (see config.h). */
#define _POSIX_C_SOURCE 200809L
#include "infmoe/config.h"

#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

#include "infmoe/util.h"

typedef enum { KEY_INT, KEY_INT64, KEY_FLOAT, KEY_STRING, KEY_ENUM } key_type;

typedef struct {
    const char *section, *key;
    key_type type;
    size_t offset;
    double min, max;          /* inclusive range for numbers */
    const char *const *names; /* KEY_ENUM: accepted values, index = enum value */
    const char *def;          /* default, parsed like a value from a file; NULL: empty */
} key_spec;

static const char *const ffn_kind_names[] = {"dense", "topk", "moge", "infinite", NULL};

const char *ffn_kind_name(ffn_kind kind) {
    ALWAYS(kind >= FFN_DENSE && kind <= FFN_INFINITE);
    return ffn_kind_names[kind];
}
static const char *const mask_names[] = {"window", "learned", NULL};
static const char *const sampling_names[] = {"iid", "stratified", NULL};
static const char *const gate_names[] = {"noisy", "switch", NULL};
static const char *const precision_names[] = {"fp32", "bf16", "auto", NULL};
const char *precision_name(precision_kind p) {
    ALWAYS(p >= PRECISION_FP32 && p <= PRECISION_AUTO);
    return precision_names[p];
}
static const char *const attention_names[] = {"fused", "stored", NULL};
static const char *const bool_names[] = {"false", "true", NULL};
static const char *const moge_convention_names[] = {"mean", "official", NULL};
static const char *const alltoall_names[] = {"flat", "node", NULL};
static const char *const grad_reduce_names[] = {"blocking", "overlap", NULL};
static const char *const tokenizer_names[] = {"byte", "gpt2", NULL};
const char *tokenizer_name(tokenizer_kind t) {
    ALWAYS(t >= TOKENIZER_BYTE && t <= TOKENIZER_GPT2);
    return tokenizer_names[t];
}

#define OFF(field) offsetof(run_config, field)
static const key_spec schema[] = {
    {"model", "n_layer", KEY_INT, OFF(n_layer), 1, 1024, NULL, "2"},
    {"model", "n_embd", KEY_INT, OFF(n_embd), 1, 65536, NULL, "64"},
    {"model", "n_head", KEY_INT, OFF(n_head), 1, 4096, NULL, "4"},
    {"model", "seq_len", KEY_INT, OFF(seq_len), 1, 1 << 20, NULL, "64"},
    {"model", "vocab_size", KEY_INT, OFF(vocab_size), 2, 65536, NULL, "256"},
    {"ffn", "kind", KEY_ENUM, OFF(ffn_kind), 0, 0, ffn_kind_names, "dense"},
    {"ffn", "hidden", KEY_INT, OFF(ffn_hidden), 0, 1 << 24, NULL, "0"},
    {"ffn", "every", KEY_INT, OFF(ffn_every), 1, 1024, NULL, "1"},
    {"ffn", "experts", KEY_INT, OFF(experts), 1, 65536, NULL, "8"},
    {"ffn", "k", KEY_INT, OFF(top_k), 1, 65536, NULL, "2"},
    {"ffn", "expert_hidden", KEY_INT, OFF(expert_hidden), 0, 1 << 24, NULL, "0"},
    {"ffn", "gate", KEY_ENUM, OFF(gate), 0, 0, gate_names, "noisy"},
    {"ffn", "w_importance", KEY_FLOAT, OFF(w_importance), 0, 1e30, NULL, "0.1"},
    {"ffn", "w_load", KEY_FLOAT, OFF(w_load), 0, 1e30, NULL, "0.1"},
    {"ffn", "aux_alpha", KEY_FLOAT, OFF(aux_alpha), 0, 1e30, NULL, "0.01"},
    {"ffn", "z_loss", KEY_FLOAT, OFF(z_loss), 0, 1e30, NULL, "0"},
    {"ffn", "jitter", KEY_FLOAT, OFF(jitter), 0, 0.5, NULL, "0"},
    {"ffn", "capacity_factor", KEY_FLOAT, OFF(capacity_factor), -1e30, 1e30, NULL, "0"},
    {"ffn", "collapse_guard_steps", KEY_INT, OFF(collapse_guard_steps), 0, INT_MAX, NULL, "0"},
    {"ffn", "collapse_margin", KEY_FLOAT, OFF(collapse_margin), 0, 1, NULL, "0.01"},
    {"ffn", "eval_capacity_factor", KEY_FLOAT, OFF(eval_capacity_factor), -1e30, 1e30, NULL, NULL},
    {"ffn", "expert_bias_rate", KEY_FLOAT, OFF(expert_bias_rate), 0, 1, NULL, "0"},
    {"ffn", "force_balance", KEY_ENUM, OFF(force_balance), 0, 0, bool_names, "false"},
    {"ffn", "shared_hidden", KEY_INT, OFF(shared_hidden), 0, 1 << 24, NULL, "0"},
    {"ffn", "groups", KEY_INT, OFF(groups), 0, 65536, NULL, "0"},
    {"ffn", "group_k", KEY_INT, OFF(group_k), 1, 65536, NULL, "1"},
    {"ffn", "moge_lambda", KEY_FLOAT, OFF(moge_lambda), 0, 1e30, NULL, "1e-3"},
    {"ffn", "moge_sigma_max", KEY_FLOAT, OFF(moge_sigma_max), 1e-6, 1e6, NULL, "10"},
    {"ffn", "moge_sigma_min", KEY_FLOAT, OFF(moge_sigma_min), 1e-6, 1e6, NULL, "1"},
    {"ffn", "moge_gamma", KEY_FLOAT, OFF(moge_gamma), 1e-6, 1e6, NULL, "0.2"},
    {"ffn", "moge_convention", KEY_ENUM, OFF(moge_convention), 0, 0, moge_convention_names, "mean"},
    {"ffn", "units", KEY_INT, OFF(inf_units), 0, 1 << 24, NULL, "0"},
    {"ffn", "keep", KEY_FLOAT, OFF(keep), -1e30, 1e30, NULL, "0.25"},
    {"ffn", "samples", KEY_INT, OFF(samples), 1, 1024, NULL, "2"},
    {"ffn", "mask", KEY_ENUM, OFF(mask), 0, 0, mask_names, "window"},
    {"ffn", "mask_block", KEY_INT, OFF(mask_block), 1, 1 << 20, NULL, "64"},
    {"ffn", "chunk_units", KEY_INT, OFF(chunk_units), 1, 1 << 24, NULL, "256"},
    {"ffn", "tau", KEY_FLOAT, OFF(tau), 1e-6, 1e6, NULL, "0.5"},
    {"ffn", "latent_dim", KEY_INT, OFF(latent_dim), 0, 1024, NULL, "0"},
    {"ffn", "router_hidden", KEY_INT, OFF(router_hidden), 1, 1 << 16, NULL, "256"},
    {"ffn", "kl_weight", KEY_FLOAT, OFF(kl_weight), 0, 1e30, NULL, "0"},
    {"ffn", "sigma_min", KEY_FLOAT, OFF(sigma_min), 1e-6, 1, NULL, "1e-4"},
    {"ffn", "balance_rate", KEY_FLOAT, OFF(balance_rate), 0, 1, NULL, "0"},
    {"ffn", "sampling", KEY_ENUM, OFF(stratified), 0, 0, sampling_names, "iid"},
    {"ffn", "samples_max", KEY_INT, OFF(samples_max), 0, 1024, NULL, "0"},
    {"train", "steps", KEY_INT, OFF(steps), 1, INT_MAX, NULL, "100"},
    {"train", "batch_size", KEY_INT, OFF(batch_size), 1, 1 << 24, NULL, "8"},
    {"train", "lr", KEY_FLOAT, OFF(lr), 0, 10, NULL, "3e-4"},
    {"train", "warmup", KEY_INT, OFF(warmup), 0, INT_MAX, NULL, "0"},
    {"train", "min_lr", KEY_FLOAT, OFF(min_lr), 0, 10, NULL, "0"},
    {"train", "weight_decay", KEY_FLOAT, OFF(weight_decay), 0, 10, NULL, "0.1"},
    {"train", "grad_clip", KEY_FLOAT, OFF(grad_clip), 0, 1e30, NULL, "1.0"},
    {"train", "beta1", KEY_FLOAT, OFF(beta1), 0, 0.999999, NULL, "0.9"},
    {"train", "beta2", KEY_FLOAT, OFF(beta2), 0, 0.9999999, NULL, "0.95"},
    {"train", "eps", KEY_FLOAT, OFF(adam_eps), 1e-30, 1, NULL, "1e-8"},
    {"train", "seed", KEY_INT64, OFF(seed), 0, 9.2e18, NULL, "1337"},
    {"train", "precision", KEY_ENUM, OFF(precision), 0, 0, precision_names, "fp32"},
    {"train", "attention", KEY_ENUM, OFF(att_stored), 0, 0, attention_names, "fused"},
    {"train", "log_every", KEY_INT, OFF(log_every), 1, INT_MAX, NULL, "10"},
    {"train", "eval_every", KEY_INT, OFF(eval_every), 0, INT_MAX, NULL, "0"},
    {"train", "eval_batches", KEY_INT, OFF(eval_batches), 1, INT_MAX, NULL, "4"},
    {"train", "ckpt_every", KEY_INT, OFF(ckpt_every), 0, INT_MAX, NULL, "0"},
    {"train", "stats_every", KEY_INT, OFF(stats_every), 0, INT_MAX, NULL, "0"},
    {"train", "keep_last", KEY_INT, OFF(keep_last), 0, INT_MAX, NULL, "3"},
    {"data", "train", KEY_STRING, OFF(data_train), 0, 0, NULL, NULL},
    {"data", "val", KEY_STRING, OFF(data_val), 0, 0, NULL, NULL},
    {"data", "tokenizer", KEY_ENUM, OFF(tokenizer), 0, 0, tokenizer_names, "byte"},
    {"data", "vocab", KEY_STRING, OFF(data_vocab), 0, 0, NULL, "data/gpt2"},
    {"parallel", "ep", KEY_INT, OFF(ep), 1, 1 << 20, NULL, "1"},
    {"parallel", "alltoall", KEY_ENUM, OFF(alltoall_node), 0, 0, alltoall_names, "flat"},
    {"parallel", "alltoall_chunks", KEY_INT, OFF(alltoall_chunks), 1, 1 << 20, NULL, "1"},
    {"parallel", "grad_reduce", KEY_ENUM, OFF(grad_overlap), 0, 0, grad_reduce_names, "overlap"},
    {"parallel", "grad_bucket_mb", KEY_FLOAT, OFF(grad_bucket_mb), 0.0001, 1024, NULL, "4"},
    {"output", "dir", KEY_STRING, OFF(output_dir), 0, 0, NULL, NULL},
};
#undef OFF
enum { N_KEYS = sizeof schema / sizeof schema[0] };

/* Where each key was set (line 0: not set in the file), for messages. */
typedef struct {
    const char *name; /* file name, or "--set" */
    int line[N_KEYS], col[N_KEYS];
    int quiet;
} load_ctx;

static void config_error(const load_ctx *ctx, int line, int col, const char *fmt, ...)
    __attribute__((noreturn, format(printf, 4, 5)));

static void config_error(const load_ctx *ctx, int line, int col, const char *fmt, ...) {
    if (!ctx->quiet) {
        char msg[1536];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        if (line > 0)
            fprintf(stderr, "%s:%d:%d: %s\n", ctx->name, line, col, msg);
        else
            fprintf(stderr, "%s: %s\n", ctx->name, msg);
        fflush(stderr);
    }
    infmoe_exit(1);
}

static const char *set_value(run_config *cfg, const key_spec *spec, const char *value,
                             char *err, size_t errcap);

void config_defaults(run_config *cfg) {
    memset(cfg, 0, sizeof *cfg);
    char err[256];
    for (int i = 0; i < N_KEYS; i++)
        if (schema[i].def && set_value(cfg, &schema[i], schema[i].def, err, sizeof err))
            INFMOE_FAIL("bad default in the config schema: %s", err);
    cfg->eval_capacity_factor = NAN; /* unset: as capacity_factor (validate) */
}

static const key_spec *find_key(const char *section, const char *key, int *index) {
    for (int i = 0; i < N_KEYS; i++)
        if (strcmp(schema[i].section, section) == 0 && strcmp(schema[i].key, key) == 0) {
            *index = i;
            return &schema[i];
        }
    return NULL;
}

static int is_section(const char *section) {
    for (int i = 0; i < N_KEYS; i++)
        if (strcmp(schema[i].section, section) == 0) return 1;
    return 0;
}

/* Keys of one section, comma separated, for "expected one of" messages. */
static void section_keys(const char *section, char *out, size_t cap) {
    out[0] = '\0';
    for (int i = 0; i < N_KEYS; i++) {
        if (strcmp(schema[i].section, section) != 0) continue;
        if (out[0]) strncat(out, ", ", cap - strlen(out) - 1);
        strncat(out, schema[i].key, cap - strlen(out) - 1);
    }
}

static const char *type_name(key_type t) {
    switch (t) {
    case KEY_INT:
    case KEY_INT64: return "an integer";
    case KEY_FLOAT: return "a number";
    case KEY_STRING: return "a string";
    case KEY_ENUM: return "one of the names listed";
    }
    return "?";
}

/* Parse `value` into the field of `spec`; returns NULL or an error message. */
static const char *set_value(run_config *cfg, const key_spec *spec, const char *value,
                             char *err, size_t errcap) {
    char *field = (char *)cfg + spec->offset;
    char *end = NULL;
    if (value[0] == '\0') {
        snprintf(err, errcap, "%s.%s: expected %s, got an empty value", spec->section, spec->key,
                 type_name(spec->type));
        return err;
    }
    switch (spec->type) {
    case KEY_INT:
    case KEY_INT64: {
        errno = 0;
        long long v = strtoll(value, &end, 10);
        if (errno || *end != '\0') {
            snprintf(err, errcap, "%s.%s: expected an integer, got '%s'", spec->section,
                     spec->key, value);
            return err;
        }
        if ((double)v < spec->min || (double)v > spec->max) {
            snprintf(err, errcap, "%s.%s: %lld is out of range [%.0f, %.0f]", spec->section,
                     spec->key, v, spec->min, spec->max);
            return err;
        }
        if (spec->type == KEY_INT)
            *(int32_t *)field = (int32_t)v;
        else
            *(int64_t *)field = (int64_t)v;
        return NULL;
    }
    case KEY_FLOAT: {
        errno = 0;
        double v = strtod(value, &end);
        if (errno || *end != '\0' || !isfinite(v)) {
            snprintf(err, errcap, "%s.%s: expected a number, got '%s'", spec->section, spec->key,
                     value);
            return err;
        }
        if (v < spec->min || v > spec->max) {
            snprintf(err, errcap, "%s.%s: %g is out of range [%g, %g]", spec->section, spec->key,
                     v, spec->min, spec->max);
            return err;
        }
        *(float *)field = (float)v;
        return NULL;
    }
    case KEY_STRING:
        if (strlen(value) >= 1024) {
            snprintf(err, errcap, "%s.%s: value longer than 1023 characters", spec->section,
                     spec->key);
            return err;
        }
        strcpy(field, value);
        return NULL;
    case KEY_ENUM:
        for (int i = 0; spec->names[i]; i++)
            if (strcmp(spec->names[i], value) == 0) {
                *(int *)field = i;
                return NULL;
            }
        {
            char list[256] = "";
            for (int i = 0; spec->names[i]; i++) {
                if (i) strncat(list, ", ", sizeof list - strlen(list) - 1);
                strncat(list, spec->names[i], sizeof list - strlen(list) - 1);
            }
            snprintf(err, errcap, "%s.%s: expected one of %s, got '%s'", spec->section, spec->key,
                     list, value);
        }
        return err;
    }
    return NULL;
}

static const char *node_kind(const yaml_node_t *n) {
    switch (n->type) {
    case YAML_MAPPING_NODE: return "a mapping";
    case YAML_SEQUENCE_NODE: return "a list";
    default: return "a scalar";
    }
}

static void apply_document(run_config *cfg, load_ctx *ctx, yaml_document_t *doc) {
    yaml_node_t *root = yaml_document_get_root_node(doc);
    if (!root) return; /* an empty file: all defaults */
    if (root->type != YAML_MAPPING_NODE)
        config_error(ctx, (int)root->start_mark.line + 1, (int)root->start_mark.column + 1,
                     "expected a mapping of sections (model, ffn, train, data, parallel, "
                     "output), got %s",
                     node_kind(root));
    for (yaml_node_pair_t *p = root->data.mapping.pairs.start; p < root->data.mapping.pairs.top;
         p++) {
        yaml_node_t *k = yaml_document_get_node(doc, p->key);
        yaml_node_t *v = yaml_document_get_node(doc, p->value);
        int kl = (int)k->start_mark.line + 1, kc = (int)k->start_mark.column + 1;
        if (k->type != YAML_SCALAR_NODE)
            config_error(ctx, kl, kc, "expected a section name, got %s", node_kind(k));
        const char *section = (const char *)k->data.scalar.value;
        if (!is_section(section))
            config_error(ctx, kl, kc,
                         "unknown section '%s' (expected model, ffn, train, data, parallel or "
                         "output)",
                         section);
        for (yaml_node_pair_t *q = root->data.mapping.pairs.start; q < p; q++) {
            yaml_node_t *k2 = yaml_document_get_node(doc, q->key);
            if (k2->type == YAML_SCALAR_NODE &&
                strcmp((const char *)k2->data.scalar.value, section) == 0)
                config_error(ctx, kl, kc, "section '%s' appears twice", section);
        }
        if (v->type == YAML_SCALAR_NODE && v->data.scalar.length == 0) continue; /* "model:" */
        if (v->type != YAML_MAPPING_NODE)
            config_error(ctx, (int)v->start_mark.line + 1, (int)v->start_mark.column + 1,
                         "section '%s': expected a mapping of keys, got %s", section,
                         node_kind(v));
        for (yaml_node_pair_t *e = v->data.mapping.pairs.start; e < v->data.mapping.pairs.top;
             e++) {
            yaml_node_t *ek = yaml_document_get_node(doc, e->key);
            yaml_node_t *ev = yaml_document_get_node(doc, e->value);
            int el = (int)ek->start_mark.line + 1, ec = (int)ek->start_mark.column + 1;
            if (ek->type != YAML_SCALAR_NODE)
                config_error(ctx, el, ec, "%s: expected a key name, got %s", section,
                             node_kind(ek));
            const char *key = (const char *)ek->data.scalar.value;
            int index;
            const key_spec *spec = find_key(section, key, &index);
            if (!spec) {
                char keys[512];
                section_keys(section, keys, sizeof keys);
                config_error(ctx, el, ec, "unknown key '%s.%s' (keys of %s: %s)", section, key,
                             section, keys);
            }
            if (ctx->line[index] > 0)
                config_error(ctx, el, ec, "key '%s.%s' appears twice (first at line %d)", section,
                             key, ctx->line[index]);
            int vl = (int)ev->start_mark.line + 1, vc = (int)ev->start_mark.column + 1;
            if (ev->type != YAML_SCALAR_NODE)
                config_error(ctx, vl, vc, "%s.%s: expected %s, got %s", section, key,
                             type_name(spec->type), node_kind(ev));
            char err[1024];
            if (set_value(cfg, spec, (const char *)ev->data.scalar.value, err, sizeof err))
                config_error(ctx, vl, vc, "%s", err);
            ctx->line[index] = vl;
            ctx->col[index] = vc;
        }
    }
}

/* libyaml's error in `parser` as one config_error line. */
static void yaml_fail(const load_ctx *ctx, yaml_parser_t *parser) __attribute__((noreturn));
static void yaml_fail(const load_ctx *ctx, yaml_parser_t *parser) {
    const char *problem = parser->problem ? parser->problem : "malformed YAML";
    int line = (int)parser->problem_mark.line + 1, col = (int)parser->problem_mark.column + 1;
    char msg[512];
    if (parser->context)
        snprintf(msg, sizeof msg, "malformed YAML: %s %s started at line %d, column %d", problem,
                 parser->context, (int)parser->context_mark.line + 1,
                 (int)parser->context_mark.column + 1);
    else
        snprintf(msg, sizeof msg, "malformed YAML: %s", problem);
    yaml_parser_delete(parser);
    config_error(ctx, line, col, "%s", msg);
}

/* Sections hold keys: a config is two levels deep, and the limit stops a deeply
 * nested file at its first levels, before libyaml's scanner (quadratic in the
 * depth) walks the rest. */
enum { MAX_YAML_DEPTH = 64 };

/*
 * Walk the events of `text`: refuse a second document (libyaml's loader would read
 * the first alone) and nesting deeper than MAX_YAML_DEPTH, and report malformed
 * YAML wherever it is.
 */
static void check_yaml_shape(const load_ctx *ctx, const char *text, size_t len) {
    yaml_parser_t parser;
    if (!yaml_parser_initialize(&parser)) INFMOE_FAIL("libyaml: cannot initialise the parser");
    yaml_parser_set_input_string(&parser, (const unsigned char *)text, len);
    int depth = 0, documents = 0, first_line = 0;
    for (;;) {
        yaml_event_t ev;
        if (!yaml_parser_parse(&parser, &ev)) yaml_fail(ctx, &parser);
        yaml_event_type_t type = ev.type;
        int line = (int)ev.start_mark.line + 1, col = (int)ev.start_mark.column + 1;
        yaml_event_delete(&ev);
        if (type == YAML_STREAM_END_EVENT) break;
        if (type == YAML_DOCUMENT_START_EVENT && ++documents == 1) first_line = line;
        if (type == YAML_DOCUMENT_START_EVENT && documents == 2) {
            yaml_parser_delete(&parser);
            config_error(ctx, line, col,
                         "a second YAML document (the first starts at line %d): a config "
                         "file holds one document",
                         first_line);
        }
        if (type == YAML_SEQUENCE_START_EVENT || type == YAML_MAPPING_START_EVENT) depth++;
        if (type == YAML_SEQUENCE_END_EVENT || type == YAML_MAPPING_END_EVENT) depth--;
        if (depth > MAX_YAML_DEPTH) {
            yaml_parser_delete(&parser);
            config_error(ctx, line, col,
                         "nested deeper than %d levels: a config is sections of keys",
                         MAX_YAML_DEPTH);
        }
    }
    yaml_parser_delete(&parser);
}

static void parse_yaml(run_config *cfg, load_ctx *ctx, const char *text, size_t len) {
    const char *nul = memchr(text, '\0', len);
    if (nul) {
        int line = 1, col = 1;
        for (const char *c = text; c < nul; c++, col++)
            if (*c == '\n') {
                line++;
                col = 0;
            }
        config_error(ctx, line, col, "a NUL byte: a config file is text");
    }
    check_yaml_shape(ctx, text, len);
    yaml_parser_t parser;
    yaml_document_t doc;
    if (!yaml_parser_initialize(&parser)) INFMOE_FAIL("libyaml: cannot initialise the parser");
    yaml_parser_set_input_string(&parser, (const unsigned char *)text, len);
    if (!yaml_parser_load(&parser, &doc)) yaml_fail(ctx, &parser);
    apply_document(cfg, ctx, &doc);
    yaml_document_delete(&doc);
    yaml_parser_delete(&parser);
}

static void apply_sets(run_config *cfg, load_ctx *ctx, int n_sets, char **sets) {
    for (int i = 0; i < n_sets; i++) {
        char buf[2048];
        if (strlen(sets[i]) >= sizeof buf)
            config_error(ctx, 0, 0, "--set %.40s...: too long", sets[i]);
        strcpy(buf, sets[i]);
        char *eq = strchr(buf, '=');
        char *dot = strchr(buf, '.');
        if (!eq || !dot || dot > eq)
            config_error(ctx, 0, 0, "--set %s: expected section.key=value", sets[i]);
        *eq = '\0';
        *dot = '\0';
        int index;
        const key_spec *spec = find_key(buf, dot + 1, &index);
        if (!spec) {
            if (!is_section(buf))
                config_error(ctx, 0, 0, "--set %s: unknown section '%s'", sets[i], buf);
            char keys[512];
            section_keys(buf, keys, sizeof keys);
            config_error(ctx, 0, 0, "--set %s: unknown key '%s.%s' (keys of %s: %s)", sets[i],
                         buf, dot + 1, buf, keys);
        }
        char err[1024];
        if (set_value(cfg, spec, eq + 1, err, sizeof err))
            config_error(ctx, 0, 0, "--set: %s", err);
        ctx->line[index] = 0; /* an override has no file position */
    }
}

/* Error at the position of `section.key` if the file set it, else without one. */
#define KEY_ERROR(ctx, section, key, ...)                                                     \
    do {                                                                                     \
        int i_ = 0;                                                                          \
        find_key(section, key, &i_);                                                         \
        config_error(ctx, (ctx)->line[i_], (ctx)->col[i_], __VA_ARGS__);                      \
    } while (0)

/*
 * Hierarchical MoE (ffn.groups > 0): noisy top-k at both levels, groups of whole
 * experts held by one rank each, and none of the features that act on the flat
 * list of experts (they are not built for two levels).
 */
static void check_groups(run_config *cfg, load_ctx *ctx) {
    const int G = cfg->groups;
    if (cfg->ffn_kind != FFN_TOPK)
        KEY_ERROR(ctx, "ffn", "groups", "ffn.groups (%d) applies to ffn.kind topk, not %s", G,
                  ffn_kind_name(cfg->ffn_kind));
    if (G < 2 || cfg->experts % G != 0)
        KEY_ERROR(ctx, "ffn", "groups",
                  "ffn.groups (%d) must be at least 2 and divide ffn.experts (%d): each group holds "
                  "experts/groups experts", G, cfg->experts);
    if (cfg->group_k > G)
        KEY_ERROR(ctx, "ffn", "group_k", "ffn.group_k (%d) must not exceed ffn.groups (%d)",
                  cfg->group_k, G);
    if (cfg->top_k > cfg->experts / G)
        KEY_ERROR(ctx, "ffn", "k",
                  "ffn.k (%d) must not exceed the experts of a group (%d = ffn.experts / ffn.groups): "
                  "with ffn.groups, ffn.k experts are chosen in each of ffn.group_k groups",
                  cfg->top_k, cfg->experts / G);
    if (G % cfg->ep != 0)
        KEY_ERROR(ctx, "ffn", "groups",
                  "ffn.groups (%d) must be divisible by parallel.ep (%d): each rank holds whole "
                  "groups of experts", G, cfg->ep);
    const char *other = cfg->gate != GATE_NOISY          ? "ffn.gate: switch"
                        : cfg->z_loss > 0                 ? "ffn.z_loss"
                        : cfg->jitter > 0                 ? "ffn.jitter"
                        : cfg->expert_bias_rate > 0       ? "ffn.expert_bias_rate"
                        : cfg->force_balance              ? "ffn.force_balance"
                        : cfg->collapse_guard_steps > 0   ? "ffn.collapse_guard_steps"
                                                          : NULL;
    if (other)
        KEY_ERROR(ctx, "ffn", "groups",
                  "ffn.groups (hierarchical MoE: noisy top-k gates at two levels) cannot be combined "
                  "with %s; use flat routing (ffn.groups: 0) for it", other);
}

static void validate(run_config *cfg, load_ctx *ctx) {
    if (cfg->n_embd % cfg->n_head != 0)
        KEY_ERROR(ctx, "model", "n_head",
                  "model.n_embd (%d) must be divisible by model.n_head (%d)", cfg->n_embd,
                  cfg->n_head);
    if (cfg->ffn_hidden == 0) cfg->ffn_hidden = 4 * cfg->n_embd;
    if (cfg->groups > 0) check_groups(cfg, ctx);
    if (cfg->ffn_kind != FFN_DENSE && cfg->ffn_every > cfg->n_layer)
        KEY_ERROR(ctx, "ffn", "every",
                  "ffn.every (%d) exceeds model.n_layer (%d): no layer would get the %s FFN "
                  "(it goes in layers every-1, 2 every-1, ...); for a dense model use "
                  "ffn.kind: dense",
                  cfg->ffn_every, cfg->n_layer, ffn_kind_name(cfg->ffn_kind));
    if (cfg->alltoall_chunks > 1 && (cfg->ffn_kind == FFN_DENSE || cfg->ffn_kind == FFN_INFINITE))
        KEY_ERROR(ctx, "parallel", "alltoall_chunks",
                  "parallel.alltoall_chunks (%d) applies to the discrete MoE kinds (it splits a "
                  "rank's experts into groups); ffn.kind %s exchanges in one piece",
                  cfg->alltoall_chunks, ffn_kind_name(cfg->ffn_kind));
    if (cfg->samples_max != 0 && cfg->ffn_kind != FFN_INFINITE)
        KEY_ERROR(ctx, "ffn", "samples_max",
                  "ffn.samples_max (%d) applies to ffn.kind: infinite (the samples per token); "
                  "ffn.kind is %s", cfg->samples_max, ffn_kind_name(cfg->ffn_kind));
    if (cfg->ffn_kind == FFN_INFINITE) {
        if (cfg->inf_units == 0) cfg->inf_units = 2 * cfg->ffn_hidden;
        if (!(cfg->keep > 0.0f && cfg->keep <= 1.0f))
            KEY_ERROR(ctx, "ffn", "keep", "ffn.keep (%g) must be in (0, 1]: the fraction of units "
                                          "each sample keeps", cfg->keep);
        if (cfg->latent_dim == 0) cfg->latent_dim = cfg->mask == MASK_WINDOW ? 1 : 8;
        if (cfg->mask != MASK_WINDOW && cfg->balance_rate > 0)
            KEY_ERROR(ctx, "ffn", "balance_rate",
                      "ffn.balance_rate (%g) applies to ffn.mask: window (it evens out use of the ring)",
                      cfg->balance_rate);
        if (cfg->samples_max != 0 && cfg->samples_max < cfg->samples)
            KEY_ERROR(ctx, "ffn", "samples_max",
                      "ffn.samples_max (%d) must be 0 (train at ffn.samples) or at least ffn.samples "
                      "(%d): each training step draws its K from ffn.samples..ffn.samples_max",
                      cfg->samples_max, cfg->samples);
        if (cfg->stratified && cfg->latent_dim != 1)
            KEY_ERROR(ctx, "ffn", "sampling",
                      "ffn.sampling: stratified needs one latent dimension (ffn.latent_dim is %d): "
                      "the strata are intervals of the Gaussian along it",
                      cfg->latent_dim);
        if (cfg->mask == MASK_WINDOW && cfg->latent_dim != 1)
            KEY_ERROR(ctx, "ffn", "latent_dim",
                      "ffn.latent_dim (%d) must be 1 with ffn.mask: window (units sit on a ring)",
                      cfg->latent_dim);
        if (cfg->inf_units % (cfg->ep * cfg->mask_block) != 0)
            KEY_ERROR(ctx, "ffn", "units",
                      "ffn.units (%d) must be divisible by parallel.ep x ffn.mask_block (%d x %d): "
                      "each rank holds whole blocks",
                      cfg->inf_units, cfg->ep, cfg->mask_block);
    } else if (cfg->ffn_kind != FFN_DENSE) {
        if (cfg->groups == 0 && cfg->top_k > cfg->experts)
            KEY_ERROR(ctx, "ffn", "k", "ffn.k (%d) must not exceed ffn.experts (%d)", cfg->top_k,
                      cfg->experts);
        if (cfg->experts % cfg->ep != 0)
            KEY_ERROR(ctx, "ffn", "experts",
                      "ffn.experts (%d) must be divisible by parallel.ep (%d): each rank of an "
                      "expert group holds experts/ep experts",
                      cfg->experts, cfg->ep);
        if (cfg->alltoall_chunks > cfg->experts / cfg->ep)
            KEY_ERROR(ctx, "parallel", "alltoall_chunks",
                      "parallel.alltoall_chunks (%d) exceeds the experts each rank holds (%d = "
                      "ffn.experts / parallel.ep): the chunks split a rank's experts into groups",
                      cfg->alltoall_chunks, cfg->experts / cfg->ep);
        if (cfg->alltoall_chunks > 1 && cfg->alltoall_node)
            KEY_ERROR(ctx, "parallel", "alltoall_chunks",
                      "parallel.alltoall_chunks (%d) needs parallel.alltoall: flat (the node-aware "
                      "exchange runs in one piece)",
                      cfg->alltoall_chunks);
        /* as wide as the dense FFN over the token's choices (group_k x k with groups) */
        const int32_t choices = cfg->groups > 0 ? cfg->group_k * cfg->top_k : cfg->top_k;
        if (cfg->expert_hidden == 0) cfg->expert_hidden = (cfg->ffn_hidden + choices - 1) / choices;
        if (cfg->moge_sigma_min > cfg->moge_sigma_max)
            KEY_ERROR(ctx, "ffn", "moge_sigma_min",
                      "ffn.moge_sigma_min (%g) must not exceed ffn.moge_sigma_max (%g)",
                      cfg->moge_sigma_min, cfg->moge_sigma_max);
    }
    if (isnan(cfg->eval_capacity_factor)) cfg->eval_capacity_factor = cfg->capacity_factor;
    const int discrete = cfg->ffn_kind == FFN_TOPK || cfg->ffn_kind == FFN_MOGE;
    if (!discrete && cfg->expert_bias_rate > 0)
        KEY_ERROR(ctx, "ffn", "expert_bias_rate",
                  "ffn.expert_bias_rate (%g) applies to ffn.kind topk and moge (a bias per expert), "
                  "not %s", cfg->expert_bias_rate, ffn_kind_name(cfg->ffn_kind));
    if (!discrete && cfg->force_balance)
        KEY_ERROR(ctx, "ffn", "force_balance",
                  "ffn.force_balance applies to ffn.kind topk and moge (an even assignment to "
                  "experts), not %s", ffn_kind_name(cfg->ffn_kind));
    if (cfg->force_balance && cfg->collapse_guard_steps > 0)
        KEY_ERROR(ctx, "ffn", "force_balance",
                  "ffn.force_balance replaces the routing, so ffn.collapse_guard_steps (%d) would "
                  "have nothing to guard: set one of them",
                  cfg->collapse_guard_steps);
    if (cfg->ffn_kind == FFN_DENSE && cfg->shared_hidden > 0)
        KEY_ERROR(ctx, "ffn", "shared_hidden",
                  "ffn.shared_hidden (%d) is a shared FFN beside routed experts; a dense model has "
                  "none (its width is ffn.hidden)", cfg->shared_hidden);
    if (cfg->ffn_kind == FFN_MOGE) {
        int rows = 1;
        for (int r = 1; r * r <= cfg->experts; r++)
            if (cfg->experts % r == 0) rows = r;
        if (rows < 2)
            KEY_ERROR(ctx, "ffn", "experts",
                      "ffn.experts (%d) has no 2-D map for moge: need a number with a factor "
                      "pair of at least 2 x 2 (e.g. 8 -> 2x4, 16 -> 4x4, 64 -> 8x8)",
                      cfg->experts);
    }
    if (cfg->data_train[0] == '\0')
        config_error(ctx, 0, 0, "data.train is required: the token shard(s) to train on, "
                                "e.g. data/demo/train.bin (make data builds them)");
    if (cfg->tokenizer == TOKENIZER_GPT2 && cfg->vocab_size < 50257)
        KEY_ERROR(ctx, "data", "tokenizer",
                  "data.tokenizer gpt2 needs model.vocab_size of at least 50257 (GPT-2's vocabulary), not %d",
                  cfg->vocab_size);
    if (cfg->min_lr > cfg->lr)
        KEY_ERROR(ctx, "train", "min_lr", "train.min_lr (%g) must not exceed train.lr (%g)",
                  cfg->min_lr, cfg->lr);
    if (cfg->warmup > cfg->steps) { /* a short run (--set train.steps=10) warms up throughout */
        cfg->warmup_clamped_from = cfg->warmup;
        cfg->warmup = cfg->steps;
    }
    if (cfg->eval_every > 0 && cfg->data_val[0] == '\0')
        KEY_ERROR(ctx, "train", "eval_every",
                  "train.eval_every is %d but data.val is not set: give a validation shard",
                  cfg->eval_every);
    if (cfg->output_dir[0] == '\0') {
        /* checkpoints/<config file name without directories and extension> */
        const char *base = strrchr(cfg->path, '/');
        base = base ? base + 1 : cfg->path;
        char stem[1024];
        snprintf(stem, sizeof stem, "%s", base);
        char *dot = strrchr(stem, '.');
        if (dot && dot != stem) *dot = '\0';
        snprintf(cfg->output_dir, sizeof cfg->output_dir, "checkpoints/%.1000s", stem);
    }
}

static void load(run_config *cfg, const char *name, const char *text, size_t text_len,
                 int n_sets, char **sets, int quiet) {
    load_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.name = name;
    ctx.quiet = quiet;
    config_defaults(cfg);
    snprintf(cfg->path, sizeof cfg->path, "%s", name);
    parse_yaml(cfg, &ctx, text, text_len);
    apply_sets(cfg, &ctx, n_sets, sets);
    validate(cfg, &ctx);
    /* Keep the text that produced this config: the file plus its overrides. */
    size_t len = strlen(text) + 64;
    for (int i = 0; i < n_sets; i++) len += strlen(sets[i]) + 16;
    cfg->text = xrealloc(NULL, len);
    strcpy(cfg->text, text);
    for (int i = 0; i < n_sets; i++) {
        strcat(cfg->text, "\n# --set ");
        strcat(cfg->text, sets[i]);
    }
}

void config_load_text(run_config *cfg, const char *name, const char *text, int n_sets,
                      char **sets, int quiet) {
    load(cfg, name, text, strlen(text), n_sets, sets, quiet);
}

void config_load(run_config *cfg, const char *path, int n_sets, char **sets, int quiet) {
    size_t len;
    const char *why;
    char *text = read_text_file(path, &len, &why);
    if (!text) {
        if (!quiet) fprintf(stderr, "%s: cannot read config file: %s\n", path, why);
        infmoe_exit(1);
    }
    load(cfg, path, text, len, n_sets, sets, quiet);
    free(text);
}

void config_check_layout(const run_config *cfg, int nranks, int quiet) {
    load_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.name = cfg->path;
    ctx.quiet = quiet;
    if (cfg->batch_size % nranks != 0)
        config_error(&ctx, 0, 0,
                     "train.batch_size (%d) must be divisible by the number of ranks (%d)",
                     cfg->batch_size, nranks);
    config_check_ep(cfg, nranks, quiet);
}

void config_check_ep(const run_config *cfg, int nranks, int quiet) {
    load_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.name = cfg->path;
    ctx.quiet = quiet;
    if (nranks % cfg->ep != 0)
        config_error(&ctx, 0, 0, "parallel.ep (%d) must divide the number of ranks (%d)",
                     cfg->ep, nranks);
}

void config_free(run_config *cfg) {
    free(cfg->text);
    cfg->text = NULL;
}

/*
 * The value of key spec in cfg as the config text spells it. Floats get the
 * fewest digits (6 to 9) that parse back to the same float, as set_value parses.
 */
static void format_value(const run_config *cfg, const key_spec *spec, char *out, size_t cap) {
    const char *field = (const char *)cfg + spec->offset;
    switch (spec->type) {
    case KEY_INT: snprintf(out, cap, "%d", *(const int32_t *)field); break;
    case KEY_INT64: snprintf(out, cap, "%lld", (long long)*(const int64_t *)field); break;
    case KEY_FLOAT: {
        float v = *(const float *)field;
        for (int digits = 6; digits <= 9; digits++) {
            snprintf(out, cap, "%.*g", digits, (double)v);
            if ((float)strtod(out, NULL) == v) break;
        }
        break;
    }
    case KEY_STRING: snprintf(out, cap, "%s", field); break;
    case KEY_ENUM: snprintf(out, cap, "%s", spec->names[*(const int *)field]); break;
    }
}

/* libyaml's emitter writes into this growing buffer. */
typedef struct {
    char *text;
    size_t len, cap;
} text_sink;

static int sink_write(void *data, unsigned char *bytes, size_t size) {
    text_sink *s = data;
    if (s->len + size + 1 > s->cap) {
        while (s->len + size + 1 > s->cap) s->cap = s->cap ? 2 * s->cap : 4096;
        s->text = xrealloc(s->text, s->cap);
    }
    memcpy(s->text + s->len, bytes, size);
    s->len += size;
    s->text[s->len] = '\0';
    return 1;
}

static void emit(yaml_emitter_t *e, yaml_event_t *ev, int made) {
    if (!made || !yaml_emitter_emit(e, ev))
        INFMOE_FAIL("libyaml: cannot emit the config: %s", e->problem ? e->problem : "?");
}

static void emit_scalar(yaml_emitter_t *e, const char *value, yaml_scalar_style_t style) {
    yaml_event_t ev;
    emit(e, &ev, yaml_scalar_event_initialize(&ev, NULL, NULL, (yaml_char_t *)value,
                                              (int)strlen(value), 1, 1, style));
}

static void emit_mapping_start(yaml_emitter_t *e) {
    yaml_event_t ev;
    emit(e, &ev, yaml_mapping_start_event_initialize(&ev, NULL, NULL, 1, YAML_BLOCK_MAPPING_STYLE));
}

static void emit_mapping_end(yaml_emitter_t *e) {
    yaml_event_t ev;
    emit(e, &ev, yaml_mapping_end_event_initialize(&ev));
}

char *config_resolved_text(const run_config *cfg) {
    yaml_emitter_t e;
    yaml_event_t ev;
    text_sink sink = {NULL, 0, 0};
    if (!yaml_emitter_initialize(&e)) INFMOE_FAIL("libyaml: cannot initialise the emitter");
    yaml_emitter_set_output(&e, sink_write, &sink);
    yaml_emitter_set_unicode(&e, 1);
    yaml_emitter_set_width(&e, -1); /* long paths stay on one line */
    emit(&e, &ev, yaml_stream_start_event_initialize(&ev, YAML_UTF8_ENCODING));
    emit(&e, &ev, yaml_document_start_event_initialize(&ev, NULL, NULL, NULL, 1));
    emit_mapping_start(&e);
    const char *section = NULL;
    for (int i = 0; i < N_KEYS; i++) {
        const key_spec *s = &schema[i];
        char value[1100];
        format_value(cfg, s, value, sizeof value);
        if (s->type == KEY_STRING && value[0] == '\0') continue; /* unset: "" would not load */
        if (!section || strcmp(section, s->section) != 0) {
            if (section) emit_mapping_end(&e);
            emit_scalar(&e, s->section, YAML_PLAIN_SCALAR_STYLE);
            emit_mapping_start(&e);
            section = s->section;
        }
        emit_scalar(&e, s->key, YAML_PLAIN_SCALAR_STYLE);
        /* paths in double quotes: libyaml escapes what would otherwise end or change them */
        emit_scalar(&e, value, s->type == KEY_STRING ? YAML_DOUBLE_QUOTED_SCALAR_STYLE
                                                     : YAML_PLAIN_SCALAR_STYLE);
    }
    emit_mapping_end(&e);
    emit_mapping_end(&e);
    emit(&e, &ev, yaml_document_end_event_initialize(&ev, 1));
    emit(&e, &ev, yaml_stream_end_event_initialize(&ev));
    yaml_emitter_delete(&e);
    return sink.text;
}

void config_print(const run_config *cfg, FILE *f) {
    char *text = config_resolved_text(cfg);
    fputs(text, f);
    free(text);
}

/* Keys that fix what a model's parameters are, for every FFN kind and per kind. */
static const char *const arch_all[] = {"model.n_layer", "model.n_embd", "model.n_head",
                                       "model.seq_len", "model.vocab_size", "ffn.kind",
                                       "ffn.hidden", NULL};
static const char *const arch_moe[] = {"ffn.every", "ffn.experts", "ffn.k", "ffn.expert_hidden",
                                       "ffn.gate", "ffn.shared_hidden", "ffn.groups",
                                       "ffn.group_k", NULL};
static const char *const arch_infinite[] = {"ffn.every", "ffn.units", "ffn.mask", "ffn.mask_block",
                                            "ffn.latent_dim", "ffn.router_hidden", "ffn.shared_hidden",
                                            NULL};

static int listed(const char *const *list, const char *name) {
    for (int i = 0; list[i]; i++)
        if (strcmp(list[i], name) == 0) return 1;
    return 0;
}

int config_arch_mismatch(const run_config *a, const run_config *b, char *key, char *va, char *vb,
                         size_t cap) {
    const char *const *kind = a->ffn_kind == FFN_INFINITE ? arch_infinite
                              : a->ffn_kind == FFN_DENSE  ? NULL
                                                          : arch_moe;
    for (int i = 0; i < N_KEYS; i++) {
        snprintf(key, cap, "%s.%s", schema[i].section, schema[i].key);
        if (!listed(arch_all, key) && !(kind && listed(kind, key))) continue;
        format_value(a, &schema[i], va, cap);
        format_value(b, &schema[i], vb, cap);
        if (strcmp(va, vb) != 0) return 1;
    }
    return 0;
}
