/* tensor: named tensors in one flat buffer (see tensor.h). */
#include "infmoe/tensor.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "infmoe/util.h"

size_t tensor_add(tensor_table *tab, const char *name, int ndim, const int64_t *shape, int decay,
                  tensor_init init, float std) {
    ALWAYS(ndim >= 1 && ndim <= 4 && strlen(name) < sizeof tab->t[0].name);
    ALWAYS(tensor_find(tab, name) == NULL);
    if (tab->n == tab->cap) {
        tab->cap = tab->cap ? 2 * tab->cap : 64;
        tab->t = xrealloc(tab->t, (size_t)tab->cap * sizeof(tensor_spec));
    }
    tensor_spec *s = &tab->t[tab->n++];
    memset(s, 0, sizeof *s);
    snprintf(s->name, sizeof s->name, "%s", name);
    s->ndim = ndim;
    s->numel = 1;
    for (int i = 0; i < ndim; i++) {
        s->shape[i] = shape[i];
        s->numel *= (size_t)shape[i];
    }
    s->decay = decay;
    s->init = init;
    s->std = std;
    s->offset = (tab->total + 15) / 16 * 16;
    s->global_dim0 = s->shard_block = s->shard_stride = shape[0];
    tab->total = s->offset + s->numel;
    return s->offset;
}

/* Rows of a global tensor of global_dim0 rows: blocks of `block` rows, block i at
 * global row first + i stride. */
static size_t add_strided(tensor_table *tab, const char *name, int ndim, const int64_t *shape,
                          int decay, tensor_init init, float std, int64_t global_dim0,
                          int64_t first, int64_t block, int64_t stride) {
    ALWAYS(block > 0 && shape[0] % block == 0 && stride >= block);
    ALWAYS(first >= 0 && first + (shape[0] / block - 1) * stride + block <= global_dim0);
    size_t off = tensor_add(tab, name, ndim, shape, decay, init, std);
    tensor_spec *s = &tab->t[tab->n - 1];
    s->sharded = 1;
    s->global_dim0 = global_dim0;
    s->shard_first = first;
    s->shard_block = block;
    s->shard_stride = stride;
    return off;
}

size_t tensor_add_sharded(tensor_table *tab, const char *name, int ndim, const int64_t *shape,
                          int decay, tensor_init init, float std, int64_t global_dim0,
                          int64_t first) {
    return add_strided(tab, name, ndim, shape, decay, init, std, global_dim0, first, shape[0],
                       shape[0]);
}

/* fmt holds at most one %d, for the layer (every caller passes a literal). */
static void layer_name(char *name, size_t cap, const char *fmt, int layer) {
    int n = snprintf(name, cap, fmt, layer);
    ALWAYS(n > 0 && (size_t)n < cap);
}

size_t tensor_add_layer(tensor_table *tab, const char *fmt, int layer, int ndim,
                        const int64_t *shape, int decay, tensor_init init, float std) {
    char name[sizeof tab->t[0].name];
    layer_name(name, sizeof name, fmt, layer);
    return tensor_add(tab, name, ndim, shape, decay, init, std);
}

size_t tensor_add_layer_sharded(tensor_table *tab, const char *fmt, int layer, int ndim,
                                const int64_t *shape, int decay, tensor_init init, float std,
                                int64_t global_dim0, int64_t first) {
    char name[sizeof tab->t[0].name];
    layer_name(name, sizeof name, fmt, layer);
    return tensor_add_sharded(tab, name, ndim, shape, decay, init, std, global_dim0, first);
}

size_t tensor_add_layer_strided(tensor_table *tab, const char *fmt, int layer, int ndim,
                                const int64_t *shape, int decay, tensor_init init, float std,
                                int64_t global_dim0, int64_t first, int64_t block, int64_t stride) {
    char name[sizeof tab->t[0].name];
    layer_name(name, sizeof name, fmt, layer);
    return add_strided(tab, name, ndim, shape, decay, init, std, global_dim0, first, block, stride);
}

int64_t tensor_global_row(const tensor_spec *s, int64_t j) {
    return s->shard_first + j / s->shard_block * s->shard_stride + j % s->shard_block;
}

static uint64_t name_hash(const char *name) {
    uint64_t h = 1469598103934665603ULL;
    for (const unsigned char *p = (const unsigned char *)name; *p; p++)
        h = (h ^ *p) * 1099511628211ULL;
    return h;
}

const tensor_spec *tensor_find(const tensor_table *tab, const char *name) {
    for (int i = 0; i < tab->n; i++)
        if (strcmp(tab->t[i].name, name) == 0) return &tab->t[i];
    return NULL;
}

void tensor_init_values(const tensor_table *tab, float *buf, uint64_t seed) {
    memset(buf, 0, tab->total * sizeof(float));
    for (int i = 0; i < tab->n; i++) {
        const tensor_spec *s = &tab->t[i];
        float *p = buf + s->offset;
        if (s->init == INIT_CONST)
            for (size_t k = 0; k < s->numel; k++) p[k] = s->std;
        if (s->init != INIT_NORMAL) continue;
        size_t row = s->numel / (size_t)s->shape[0];
        uint64_t h = name_hash(s->name) ^ (seed * 0x9e3779b97f4a7c15ULL);
        for (int64_t j = 0; j < s->shape[0]; j++) {
            rng_state r;
            rng_seed(&r, h + (uint64_t)tensor_global_row(s, j) * 0xd1342543de82ef95ULL);
            for (size_t k = 0; k < row; k++) p[(size_t)j * row + k] = s->std * rng_normal(&r);
        }
    }
}

void tensor_table_free(tensor_table *tab) {
    free(tab->t);
    memset(tab, 0, sizeof *tab);
}
