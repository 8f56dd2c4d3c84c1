/*
 * stats_rows: reading one scalar field of one record of a stats.h5 layer's /rows
 * dataset, for the tests that check what the writer stored.
 */
#ifndef INFMOE_TESTS_STATS_ROWS_H
#define INFMOE_TESTS_STATS_ROWS_H

#include <hdf5.h>
#include <math.h>

/* Field `field` of record `row` of group g's /rows, as a double; NAN when unreadable. */
static inline double metric(hid_t g, const char *field, hsize_t row) {
    hid_t ds = H5Dopen2(g, "rows", H5P_DEFAULT);
    hid_t mt = H5Tcreate(H5T_COMPOUND, sizeof(double));
    H5Tinsert(mt, field, 0, H5T_NATIVE_DOUBLE);
    hid_t fsp = H5Dget_space(ds);
    hsize_t one = 1;
    H5Sselect_hyperslab(fsp, H5S_SELECT_SET, &row, NULL, &one, NULL);
    hid_t msp = H5Screate_simple(1, &one, NULL);
    double v = NAN;
    if (H5Dread(ds, mt, msp, fsp, H5P_DEFAULT, &v) < 0) v = NAN;
    H5Sclose(msp);
    H5Sclose(fsp);
    H5Tclose(mt);
    H5Dclose(ds);
    return v;
}

#endif
