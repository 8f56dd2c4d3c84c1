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
    tab->total = s->offset + s->numel;
    return s->offset;
}

const tensor_spec *tensor_find(const tensor_table *tab, const char *name) {
    for (int i = 0; i < tab->n; i++)
        if (strcmp(tab->t[i].name, name) == 0) return &tab->t[i];
    return NULL;
}

void tensor_init_values(const tensor_table *tab, float *buf, uint64_t seed) {
    rng_state r;
    rng_seed(&r, seed);
    memset(buf, 0, tab->total * sizeof(float));
    for (int i = 0; i < tab->n; i++) {
        const tensor_spec *s = &tab->t[i];
        float *p = buf + s->offset;
        for (size_t k = 0; k < s->numel; k++)
            p[k] = s->init == INIT_ONE ? 1.0f : s->init == INIT_NORMAL ? s->std * rng_normal(&r) : 0.0f;
    }
}

void tensor_table_free(tensor_table *tab) {
    free(tab->t);
    memset(tab, 0, sizeof *tab);
}
