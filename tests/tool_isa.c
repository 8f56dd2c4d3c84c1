/*
 * tool_isa: what oneDNN runs on this CPU, for the shell tests.
 *   tool_isa               the ISA name (avx2, avx512_core_bf16, ...)
 *   tool_isa --rows-exact  1 where fp32 products keep a row's bits whatever its
 *                          product's shape and thread count, else 0 (gemm.h)
 */
#include <stdio.h>
#include <string.h>

#include "infmoe/gemm.h"

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--rows-exact") == 0)
        printf("%d\n", gemm_rows_exact());
    else if (argc > 1)
        printf("usage: tool_isa [--rows-exact]\n");
    else
        printf("%s\n", gemm_isa_name());
    return 0;
}
