/* Config: defaults from the schema, values from YAML, --set overrides, derived values. */
#include <string.h>

#include "check.h"
#include "infmoe/config.h"

int main(void) {
    run_config c;
    config_load_text(&c, "configs/demo.yaml",
                     "model:\n  n_layer: 3\n  n_embd: 48\n  n_head: 6\n"
                     "train:\n  lr: 2.5e-3\n  seed: 12345678901\n"
                     "data:\n  train: data/x.bin\n",
                     0, NULL, 0);
    CHECK(c.n_layer == 3 && c.n_embd == 48 && c.n_head == 6, "model values from the file");
    CHECK(c.lr == 2.5e-3f, "train.lr %g", c.lr);
    CHECK(c.seed == 12345678901LL, "64-bit seed %lld", (long long)c.seed);
    CHECK(c.steps == 100 && c.batch_size == 8 && c.beta2 == 0.95f && c.ep == 1, "schema defaults");
    CHECK(c.ffn_kind == FFN_DENSE && c.ffn_hidden == 4 * 48, "ffn.hidden 0 means 4 x n_embd, got %d",
          c.ffn_hidden);
    CHECK(strcmp(c.output_dir, "checkpoints/demo") == 0, "output.dir default %s", c.output_dir);
    CHECK(strstr(c.text, "n_embd: 48") != NULL, "config text kept");
    config_free(&c);

    char *sets[] = {"train.steps=7", "ffn.hidden=100", "output.dir=/tmp/run", "model.n_layer=5"};
    config_load_text(&c, "x.yaml", "model:\n  n_layer: 3\ndata:\n  train: t.bin\n", 4, sets, 0);
    CHECK(c.steps == 7 && c.ffn_hidden == 100 && c.n_layer == 5, "--set overrides the file");
    CHECK(strcmp(c.output_dir, "/tmp/run") == 0, "--set output.dir");
    CHECK(strstr(c.text, "# --set train.steps=7") != NULL, "overrides recorded with the text");
    config_free(&c);

    config_load_text(&c, "empty.yaml", "", 1, (char *[]){"data.train=t.bin"}, 0);
    CHECK(c.n_layer == 2 && c.n_embd == 64, "an empty file gives the defaults");
    config_free(&c);
    return check_finish("config: defaults, file values, overrides and derived values");
}
