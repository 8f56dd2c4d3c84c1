/*
 * h5util: the HDF5 helpers that checkpoints and routing statistics share.
 *
 * h5_check(call) is for calls that fail only through a bug or a broken
 * library (property lists, types, selections): it ends the job naming the call
 * and the source line. Calls that meet the user's files (open, read, write,
 * flush) return their failure instead, and the caller says what went wrong in
 * its own words. h5_quiet() turns off HDF5's own error stack printing, so a
 * user sees one message of ours, not a page of the library's.
 */
#ifndef INFMOE_H5UTIL_H
#define INFMOE_H5UTIL_H

#include <hdf5.h>
#include <stdint.h>

/* hdf5.h defines H5CHECK: the wrapper is h5_check. */
hid_t h5_check_at(hid_t rc, const char *call, const char *file, int line);
#define h5_check(call) h5_check_at((hid_t)(call), #call, __FILE__, __LINE__)
void h5_quiet(void);

/* File access for the newest format (SWMR needs it); locking 0 turns file locks off. */
hid_t h5_fapl_latest(int locking);

/*
 * Row series: datasets [rows] (width 1) or [rows, width] of one type, chunked
 * (about 4 KiB a chunk) and extendible along rows.
 */
/* An empty series `name` in group, with a "description" attribute (descr may be NULL). */
hid_t h5_ds_create_rows(hid_t group, const char *name, hid_t ftype, int width, const char *descr);
/* Rows in a dataset (its first dimension); -1 on failure. */
int64_t h5_ds_rows(hid_t ds);
/* Grow ds to row + 1 rows and write `width` values of memtype at row: 0 or -1. */
int h5_ds_append_row(hid_t ds, hsize_t row, int width, hid_t memtype, const void *buf);
/* Read rows [0, rows) of ds as memtype into buf (width values a row): 0 or -1. */
int h5_ds_read_rows(hid_t ds, int64_t rows, int width, hid_t memtype, void *buf);

/* Create scalar attribute `name` of `type` on obj holding *value; 0 or -1. */
int h5_attr_put(hid_t obj, const char *name, hid_t type, const void *value);
int h5_attr_put_i64(hid_t obj, const char *name, int64_t value);
int h5_attr_put_f64(hid_t obj, const char *name, double value);
/* A fixed-length string attribute of strlen(value) + 1 bytes. */
int h5_attr_put_str(hid_t obj, const char *name, const char *value);

/* Read int64 attribute `name`; 0, or -1 when it is missing or unreadable. */
int h5_attr_get_i64(hid_t obj, const char *name, int64_t *out);
/* A fixed-length string attribute (malloc'd); NULL when missing or not a string. */
char *h5_attr_get_str(hid_t obj, const char *name);

#endif
