/*
 * h5util: the HDF5 attribute helpers that checkpoints and routing statistics
 * share. Scalar attributes only; every function returns its failure to the
 * caller (0 / -1, or NULL), which decides how to report it.
 */
#ifndef INFMOE_H5UTIL_H
#define INFMOE_H5UTIL_H

#include <hdf5.h>
#include <stdint.h>

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
