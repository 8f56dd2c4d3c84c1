/*
 * Golden check against the PyTorch twin (tests/golden/gen_golden.py, float64):
 * the C model loaded with the fixture's parameters must reproduce its logits,
 * loss, every gradient, the losses of 10 AdamW steps and the final parameters.
 * Run from the repository root (make test does).
 */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "infmoe/gemm.h"
#include "infmoe/model.h"
#include "infmoe/optim.h"
#include "infmoe/util.h"

#define FIXTURE "tests/golden/tiny.bin"

typedef struct {
    char name[96];
    int dtype, ndim;
    int64_t dims[4], count;
    void *data;
} record;

static record *records;
static int n_records;

static void read_exact(FILE *f, void *p, size_t n) {
    if (fread(p, 1, n, f) != n) infmoe_die("%s: truncated fixture", FIXTURE);
}

static void load_fixture(void) {
    FILE *f = fopen(FIXTURE, "rb");
    if (!f) infmoe_die("%s: cannot open (run from the repository root)", FIXTURE);
    char magic[8];
    read_exact(f, magic, 8);
    if (memcmp(magic, "IMGOLD01", 8) != 0) infmoe_die("%s: bad magic", FIXTURE);
    int32_t n;
    read_exact(f, &n, 4);
    records = xcalloc((size_t)n, sizeof(record));
    n_records = n;
    for (int i = 0; i < n; i++) {
        record *r = &records[i];
        int32_t len, dtype, ndim;
        read_exact(f, &len, 4);
        ALWAYS(len > 0 && len < (int32_t)sizeof r->name);
        read_exact(f, r->name, (size_t)len);
        read_exact(f, &dtype, 4);
        read_exact(f, &ndim, 4);
        ALWAYS(ndim >= 1 && ndim <= 4);
        r->dtype = dtype;
        r->ndim = ndim;
        r->count = 1;
        for (int d = 0; d < ndim; d++) {
            read_exact(f, &r->dims[d], 8);
            r->count *= r->dims[d];
        }
        r->data = xmalloc((size_t)r->count * 4);
        read_exact(f, r->data, (size_t)r->count * 4);
    }
    fclose(f);
}

static const record *find(const char *prefix, const char *name) {
    char full[128];
    snprintf(full, sizeof full, "%s%s", prefix, name);
    for (int i = 0; i < n_records; i++)
        if (strcmp(records[i].name, full) == 0) return &records[i];
    infmoe_die("%s: no record '%s'", FIXTURE, full);
}

/* Compare every tensor of the model buffer `buf` with the fixture's records "<prefix><name>". */
static void compare_tensors(const gpt_model *m, const float *buf, const char *prefix, double rtol,
                            double atol) {
    for (int t = 0; t < m->tensors.n; t++) {
        const tensor_spec *s = &m->tensors.t[t];
        const record *r = find(prefix, s->name);
        CHECK(r->count == (int64_t)s->numel, "%s%s: %lld values in the fixture, %zu in the model",
              prefix, s->name, (long long)r->count, s->numel);
        if (r->count != (int64_t)s->numel) continue;
        char what[128];
        snprintf(what, sizeof what, "%s%s", prefix, s->name);
        check_arrays_close(what, buf + s->offset, r->data, r->count, rtol, atol);
    }
}

int main(void) {
    load_fixture();
    run_config cfg;
    config_defaults(&cfg);
    tiny_backbone(&cfg, 32, 4, 16, 250);
    cfg.ffn_hidden = 128;
    cfg.steps = 10;
    cfg.lr = 1e-3f;
    cfg.warmup = 3;
    cfg.min_lr = 1e-4f;
    cfg.weight_decay = 0.1f;
    cfg.grad_clip = 1.0f;
    const int B = 4;
    gpt_model m;
    model_build(&m, &cfg, B, NULL);
    for (int t = 0; t < m.tensors.n; t++) {
        const tensor_spec *s = &m.tensors.t[t];
        const record *r = find("param/", s->name);
        ALWAYS(r->count == (int64_t)s->numel);
        memcpy(m.params + s->offset, r->data, s->numel * sizeof(float));
    }
    const int32_t *inputs = find("", "inputs")->data, *targets = find("", "targets")->data;

    model_forward(&m, inputs, NULL);
    const record *logits = find("", "logits");
    CHECK(logits->count == m.N * m.Vp, "logits shape");
    check_arrays_close("logits", m.logits, logits->data, logits->count, 1e-4, 1e-5);

    float loss = model_forward(&m, inputs, targets);
    float want = ((const float *)find("", "loss")->data)[0];
    CHECK(close_enough(loss, want, 1e-6, 0), "loss %.8f, PyTorch %.8f", loss, want);

    model_zero_grad(&m);
    model_backward(&m);
    compare_tensors(&m, m.grads, "grad/", 1e-3, 2e-6);

    /* 10 AdamW steps on the same batch, through the trainer's optimizer */
    const float *want_losses = find("", "adamw_losses")->data;
    for (int step = 0; step < 10; step++) {
        float l = model_forward(&m, inputs, targets);
        CHECK(close_enough(l, want_losses[step], 1e-5, 0), "AdamW step %d: loss %.8f, PyTorch %.8f",
              step, l, want_losses[step]);
        model_zero_grad(&m);
        model_backward(&m);
        double norm = sqrt(optim_sum_squares(m.grads, m.tensors.total));
        optim_adamw_step(&m.tensors, m.params, m.grads, m.m, m.v, &cfg, optim_lr(&cfg, step), step,
                         optim_clip_scale(cfg.grad_clip, norm), NULL);
    }
    compare_tensors(&m, m.params, "final/", 1e-3, 2e-5);

    model_free(&m);
    gemm_shutdown();
    return check_finish("golden: logits, loss, gradients and 10 AdamW steps equal the PyTorch twin");
}
