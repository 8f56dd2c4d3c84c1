/*
 * The resolved config (config.yaml and a checkpoint's config_resolved): valid
 * YAML that loads back to the same config bit for bit, whatever a path holds.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "infmoe/config.h"

/* The same value in every key: numbers bitwise, strings byte for byte. */
static int same_config(const run_config *a, const run_config *b) {
    run_config x = *a, y = *b;
    memset(x.path, 0, sizeof x.path);
    memset(y.path, 0, sizeof y.path);
    x.text = y.text = NULL;
    return memcmp(&x, &y, sizeof x) == 0;
}

int main(void) {
    /* a path with a quote, a backslash, ": " and " #"; floats that 6 digits would round */
    char *sets[] = {"output.dir=runs/a\"b\\c: d #e", "train.lr=0.00123456789", "train.eps=1.2345678e-9",
                    "ffn.kind=infinite", "ffn.mask=learned", "data.val=v 1.bin"};
    run_config c, back;
    config_load_text(&c, "x.yaml", "model:\n  n_embd: 48\n  n_head: 6\ndata:\n  train: t.bin\n",
                     6, sets, 0);
    char *text = config_resolved_text(&c);
    config_load_text(&back, "resolved", text, 0, NULL, 0);
    CHECK(same_config(&c, &back), "the resolved text loads back to the same config:\n%s", text);
    CHECK(back.lr == c.lr && back.adam_eps == c.adam_eps, "floats bitwise: lr %.9g eps %.9g",
          back.lr, back.adam_eps);
    CHECK(strcmp(back.output_dir, "runs/a\"b\\c: d #e") == 0, "path kept: %s", back.output_dir);
    CHECK(back.ffn_hidden == 4 * 48 && back.inf_units == 2 * 4 * 48 && back.latent_dim == 8,
          "derived defaults written out: hidden %d units %d latent_dim %d", back.ffn_hidden,
          back.inf_units, back.latent_dim);
    char *again = config_resolved_text(&back);
    CHECK(strcmp(text, again) == 0, "resolving twice gives the same text");

    char *printed = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&printed, &len);
    config_print(&c, f);
    fclose(f);
    CHECK(strcmp(printed, text) == 0, "config_print writes the resolved text");

    /* an unset path is left out rather than written as "", which would not load */
    run_config plain;
    config_load_text(&plain, "p.yaml", "data:\n  train: t.bin\n", 0, NULL, 0);
    char *plain_text = config_resolved_text(&plain);
    CHECK(strstr(plain_text, "val:") == NULL, "unset data.val left out:\n%s", plain_text);
    free(plain_text);
    config_free(&plain);
    free(printed);
    free(again);
    free(text);
    config_free(&back);
    config_free(&c);
    return check_finish("config: the resolved text is valid YAML that loads back bit for bit "
                        "(quoted paths, 9-digit floats, derived defaults)");
}
