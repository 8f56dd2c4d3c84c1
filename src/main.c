/*
 * infmoe: training Mixture-of-Experts GPT-2 models on CPU clusters with MPI.
 * main only dispatches subcommands; each lives in its module.
 */
#include <stdio.h>
#include <string.h>

#include "infmoe/ckpt.h"
#include "infmoe/data.h"
#include "infmoe/infer.h"
#include "infmoe/prep.h"
#include "infmoe/statsreport.h"
#include "infmoe/train.h"
#include "infmoe/upcycle.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: infmoe COMMAND [ARGS]\n"
            "\n"
            "commands:\n"
            "  train CONFIG   train a model (run under mpirun for several ranks)\n"
            "  prep           tokenise text files into token shards\n"
            "  eval CKPT      validation loss of a checkpoint\n"
            "  sample CKPT    generate text from a checkpoint and a prompt\n"
            "  ckpt info|verify PATH   describe or check a checkpoint\n"
            "  stats FILE     report the routing statistics of a run (stats.h5)\n"
            "  upcycle SRC    an MoE or ∞-MoE checkpoint made from a dense one (or llm.c's)\n"
            "\n"
            "'infmoe COMMAND --help' describes each command. Configs: docs/config.md.\n");
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 1;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(cmd, "train") == 0) return train_main(argc - 1, argv + 1);
    if (strcmp(cmd, "prep") == 0) return prep_main(argc - 1, argv + 1);
    if (strcmp(cmd, "ckpt") == 0) return ckpt_main(argc - 1, argv + 1);
    if (strcmp(cmd, "eval") == 0) return infer_eval_main(argc - 1, argv + 1);
    if (strcmp(cmd, "sample") == 0) return infer_sample_main(argc - 1, argv + 1);
    if (strcmp(cmd, "stats") == 0) return stats_main(argc - 1, argv + 1);
    if (strcmp(cmd, "upcycle") == 0) return upcycle_main(argc - 1, argv + 1);
    fprintf(stderr, "infmoe: unknown command '%s'\n", cmd);
    usage(stderr);
    return 1;
}
