/*
 * infer: using a trained checkpoint, on any rank count.
 *   infmoe eval CKPT    validation loss of the checkpoint on a token shard
 *   infmoe sample CKPT  text generation from a prompt (byte-level vocabularies)
 * Both read the model's config from the checkpoint and load it with resharding.
 */
#ifndef INFMOE_INFER_H
#define INFMOE_INFER_H

int infer_eval_main(int argc, char **argv);
int infer_sample_main(int argc, char **argv);

#endif
