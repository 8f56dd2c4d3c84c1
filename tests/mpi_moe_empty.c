/*
 * MoE with an expert that receives no tokens, under mpirun at any rank count and ep
 * (argv[1]). A crafted router sends every token to experts 0 and 1 only: LN2's
 * bias drives channel 0 to ~100 and the router weights on that channel are +1
 * for experts 0-2 and -1 for expert 3, so expert 3 never wins (the router noise
 * shares the tokens among 0-2). With ep = 4 the rank holding expert 3 gets no
 * rows at all. Three training steps on a fixed batch: every collective is
 * called, the run ends (no hang), expert 3 gets exactly zero gradients, and
 * rank 0 prints the losses for the caller to compare across layouts. argv[2], if
 * given, is parallel.alltoall_chunks: with 2 chunks at ep 2 or 4 at ep 1 the chunk
 * holding expert 3 alone moves no rows.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "infmoe/dist.h"
#include "infmoe/gemm.h"
#include "infmoe/model.h"
#include "infmoe/optim.h"
#include "infmoe/util.h"

int main(int argc, char **argv) {
    dist_ctx d;
    dist_init(&d, &argc, &argv);
    int ep = argc > 1 ? atoi(argv[1]) : 1;
    run_config cfg;
    config_defaults(&cfg);
    tiny_backbone(&cfg, 16, 2, 8, 64);
    cfg.ffn_kind = FFN_TOPK;
    cfg.experts = 4;
    cfg.top_k = 2;
    cfg.expert_hidden = 8;
    cfg.batch_size = 8;
    cfg.ep = ep;
    cfg.alltoall_chunks = argc > 2 ? atoi(argv[2]) : 1;
    config_check_layout(&cfg, d.size, d.rank != 0);
    dist_set_layout(&d, ep);
    int B = cfg.batch_size / d.size;
    gpt_model m;
    model_build(&m, &cfg, B, &d);
    model_init_params(&m, 3);
    for (int l = 0; l < m.L; l++) {
        m.params[m.block[l].ln2_b] = 100.0f;
        const tensor_spec *r = NULL;
        char name[64];
        snprintf(name, sizeof name, "h.%d.moe.router.w", l);
        r = tensor_find(&m.tensors, name);
        for (int e = 0; e < 4; e++) m.params[r->offset + (size_t)e * cfg.n_embd] = e < 3 ? 1.0f : -1.0f;
    }
    int32_t *tok = xcalloc((size_t)cfg.batch_size * cfg.seq_len + 1, sizeof(int32_t));
    for (int i = 0; i <= cfg.batch_size * cfg.seq_len; i++) tok[i] = (i * 37 + 11) % cfg.vocab_size;
    const int32_t *in = tok + (size_t)d.rank * B * cfg.seq_len;
    int bad = 0;
    for (int step = 0; step < 3; step++) {
        model_set_step(&m, step, (int64_t)d.rank * B * cfg.seq_len, 1);
        double loss = model_forward(&m, in, in + 1);
        model_zero_grad(&m);
        model_backward(&m);
        /* expert 3 received nothing: its gradients are exactly zero before reduction */
        for (int t = 0; t < m.tensors.n; t++) {
            const tensor_spec *s = &m.tensors.t[t];
            if (!s->sharded) continue;
            size_t row = s->numel / (size_t)s->shape[0];
            for (int64_t j = 0; j < s->shape[0]; j++)
                if (s->shard_first + j == 3)
                    for (size_t i = 0; i < row; i++) bad |= m.grads[s->offset + (size_t)j * row + i] != 0.0f;
        }
        model_reduce_gradients(&m, &d);
        optim_adamw_step(&m.tensors, m.params, m.grads, m.m, m.v, &cfg, 1e-3f, step, 1.0f, NULL);
        model_end_step(&m);
        dist_allreduce_sum_d(&loss, 1, d.world);
        stats_row st;
        ffn_stats_row(&m.ffn[0], &st);
        if (d.rank == 0)
            printf("step %d loss %.7f tokens %lld %lld %lld %lld\n", step, loss / d.size,
                   (long long)st.tokens[0], (long long)st.tokens[1], (long long)st.tokens[2],
                   (long long)st.tokens[3]);
    }
    int any_bad = bad;
    MPI_CHECK(MPI_Allreduce(&bad, &any_bad, 1, MPI_INT, MPI_MAX, d.world));
    if (d.rank == 0) printf("%s\n", any_bad ? "FAIL: the expert without tokens got gradients" : "expert without tokens: zero gradients");
    free(tok);
    model_free(&m);
    gemm_shutdown();
    dist_finalize(&d);
    return any_bad;
}
