/*
 * train: `infmoe train CONFIG [--set section.key=value]...`, the training loop.
 *
 * Each step: every rank takes its slice of the global batch, runs forward and
 * backward, gradients are averaged with one allreduce, clipped by their global
 * norm and applied with AdamW. Rank 0 logs one line per log_every steps:
 *   step 12/200 | loss 4.123456 | lr 3.00e-04 | grad_norm 1.2345 | ms 45.6 | tok/s 12345 | mfu 12.3%
 * evaluates the validation loss every eval_every steps:
 *   eval 100/200 | val_loss 3.456789
 * and ends with a summary. The log is also appended to <output.dir>/train.log.
 */
#ifndef INFMOE_TRAIN_H
#define INFMOE_TRAIN_H

int train_main(int argc, char **argv);

#endif
