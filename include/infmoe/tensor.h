/*
 * tensor: the table of named parameter tensors inside one flat buffer.
 *
 * The model registers every tensor once (name, shape, weight decay, init); the
 * table gives each an offset, so params, gradients and AdamW's m and v are four
 * buffers of table.total floats with identical layouts. Offsets are aligned to
 * 16 floats (64 bytes); the gaps are zero and stay zero.
 *
 * Expert-sharded tensors hold rows of a global tensor whose first dimension is
 * global_dim0 (experts or ∞-MoE units split over the ranks of an expert group):
 * blocks of shard_block rows, block i starting at global row shard_first + i
 * shard_stride (one block, rows [shard_first, shard_first + shape[0]), unless
 * registered strided). Initial values are drawn per slice along the first
 * dimension from a stream seeded by (seed, name, global index), so a slice has
 * the same values whichever rank holds it.
 */
#ifndef INFMOE_TENSOR_H
#define INFMOE_TENSOR_H

#include <stddef.h>
#include <stdint.h>

typedef enum { INIT_ZERO, INIT_CONST, INIT_NORMAL } tensor_init;

typedef struct {
    char name[64];
    int ndim;
    int64_t shape[4];
    size_t offset, numel;
    int decay;         /* AdamW weight decay applies (matrices, not biases or norms) */
    tensor_init init;
    float std;         /* INIT_NORMAL: the standard deviation; INIT_CONST: the value */
    int sharded;       /* expert-parallel: rows of a larger global tensor */
    int64_t global_dim0, shard_first, shard_block, shard_stride;
} tensor_spec;

typedef struct {
    tensor_spec *t;
    int n, cap;
    size_t total; /* floats in the buffer, alignment gaps included */
} tensor_table;

/* Register a tensor; returns its offset. Names must be unique. */
size_t tensor_add(tensor_table *tab, const char *name, int ndim, const int64_t *shape, int decay,
                  tensor_init init, float std);
/* Register rows [first, first + shape[0]) of a tensor of global_dim0 rows. */
size_t tensor_add_sharded(tensor_table *tab, const char *name, int ndim, const int64_t *shape,
                          int decay, tensor_init init, float std, int64_t global_dim0,
                          int64_t first);
/*
 * The same with the name made from fmt and a layer index ("h.%d.ffn.fc.w"; a
 * name without %d is taken as it is): how every layer names its tensors.
 */
size_t tensor_add_layer(tensor_table *tab, const char *fmt, int layer, int ndim,
                        const int64_t *shape, int decay, tensor_init init, float std);
size_t tensor_add_layer_sharded(tensor_table *tab, const char *fmt, int layer, int ndim,
                                const int64_t *shape, int decay, tensor_init init, float std,
                                int64_t global_dim0, int64_t first);
/* Register blocks of `block` rows, block i at global rows first + i stride (shape[0] a
 * multiple of block): a cyclic shard. */
size_t tensor_add_layer_strided(tensor_table *tab, const char *fmt, int layer, int ndim,
                                const int64_t *shape, int decay, tensor_init init, float std,
                                int64_t global_dim0, int64_t first, int64_t block, int64_t stride);
/* The global row of local row j of tensor s. */
int64_t tensor_global_row(const tensor_spec *s, int64_t j);
/* The tensor called `name`, or NULL. */
const tensor_spec *tensor_find(const tensor_table *tab, const char *name);
/* Fill `buf` with every tensor's initial values, drawn in table order from `seed`. */
void tensor_init_values(const tensor_table *tab, float *buf, uint64_t seed);
void tensor_table_free(tensor_table *tab);

#endif
