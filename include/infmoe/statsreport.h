/*
 * statsreport: the `infmoe stats` command. Reads a stats.h5 file (statsfile.h),
 * also while a run appends to it, and prints per MoE layer the share of tokens
 * per expert or block as bars, load imbalance, unused buckets, entropies, drops,
 * ∞-MoE sigma/overlap and time per phase; or the rows as CSV, or new rows as
 * they arrive (--follow). Options: infmoe stats --help.
 */
#ifndef INFMOE_STATSREPORT_H
#define INFMOE_STATSREPORT_H

/* infmoe stats FILE [--layers LIST] [--steps FROM:TO] [--csv] [--follow] */
int stats_main(int argc, char **argv);

#endif
