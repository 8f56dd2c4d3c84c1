/* h5util: HDF5 helpers shared by ckpt and the stats file (see h5util.h). */
#include "infmoe/h5util.h"

#include <stdlib.h>
#include <string.h>

#include "infmoe/util.h"

hid_t h5_check_at(hid_t rc, const char *call, const char *file, int line) {
    if (rc < 0) infmoe_fail_at(file, line, "HDF5 call failed: %s", call);
    return rc;
}

void h5_quiet(void) { H5Eset_auto2(H5E_DEFAULT, NULL, NULL); }


int h5_attr_put(hid_t obj, const char *name, hid_t type, const void *value) {
    hid_t sp = H5Screate(H5S_SCALAR);
    if (sp < 0) return -1;
    hid_t a = H5Acreate2(obj, name, type, sp, H5P_DEFAULT, H5P_DEFAULT);
    int ok = a >= 0 && H5Awrite(a, type, value) >= 0;
    if (a >= 0) H5Aclose(a);
    H5Sclose(sp);
    return ok ? 0 : -1;
}

int h5_attr_put_i64(hid_t obj, const char *name, int64_t value) {
    return h5_attr_put(obj, name, H5T_NATIVE_INT64, &value);
}

int h5_attr_put_f64(hid_t obj, const char *name, double value) {
    return h5_attr_put(obj, name, H5T_NATIVE_DOUBLE, &value);
}

int h5_attr_put_str(hid_t obj, const char *name, const char *value) {
    hid_t t = H5Tcopy(H5T_C_S1);
    if (t < 0) return -1;
    int rc = H5Tset_size(t, strlen(value) + 1) < 0 ? -1 : h5_attr_put(obj, name, t, value);
    H5Tclose(t);
    return rc;
}

int h5_attr_get_i64(hid_t obj, const char *name, int64_t *out) {
    if (H5Aexists(obj, name) <= 0) return -1;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
    if (a < 0) return -1;
    herr_t rc = H5Aread(a, H5T_NATIVE_INT64, out);
    H5Aclose(a);
    return rc < 0 ? -1 : 0;
}

char *h5_attr_get_str(hid_t obj, const char *name) {
    if (H5Aexists(obj, name) <= 0) return NULL;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
    if (a < 0) return NULL;
    hid_t t = H5Aget_type(a);
    char *s = NULL;
    if (t >= 0 && H5Tget_class(t) == H5T_STRING && !H5Tis_variable_str(t)) {
        size_t n = H5Tget_size(t);
        s = xcalloc(n + 1, 1);
        hid_t mt = H5Tcopy(H5T_C_S1);
        H5Tset_size(mt, n);
        if (H5Aread(a, mt, s) < 0) {
            free(s);
            s = NULL;
        }
        H5Tclose(mt);
    }
    if (t >= 0) H5Tclose(t);
    H5Aclose(a);
    return s;
}

int64_t h5_ds_rows(hid_t ds) {
    hid_t sp = H5Dget_space(ds);
    if (sp < 0) return -1;
    hsize_t dims[2] = {0, 0};
    int nd = H5Sget_simple_extent_dims(sp, dims, NULL);
    H5Sclose(sp);
    return nd < 1 ? -1 : (int64_t)dims[0];
}

hid_t h5_ds_create_rows(hid_t group, const char *name, hid_t ftype, int width, const char *descr) {
    int nd = width > 1 ? 2 : 1;
    hsize_t dims[2] = {0, (hsize_t)width}, maxd[2] = {H5S_UNLIMITED, (hsize_t)width};
    size_t row_bytes = H5Tget_size(ftype) * (size_t)width;
    hsize_t rows = (hsize_t)(4096 / row_bytes);
    hsize_t chunk[2] = {rows < 1 ? 1 : rows, (hsize_t)width};
    hid_t sp = h5_check(H5Screate_simple(nd, dims, maxd));
    hid_t dcpl = h5_check(H5Pcreate(H5P_DATASET_CREATE));
    h5_check(H5Pset_chunk(dcpl, nd, chunk));
    h5_check(H5Pset_fletcher32(dcpl)); /* a reader tells damaged rows from numbers */
    h5_check(H5Pset_obj_track_times(dcpl, 0)); /* no modification time: one object header write less per row */
    hid_t ds = H5Dcreate2(group, name, ftype, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    H5Pclose(dcpl);
    H5Sclose(sp);
    if (ds >= 0 && descr && h5_attr_put_str(ds, "description", descr) < 0) {
        H5Dclose(ds);
        return -1;
    }
    return ds;
}

/* Rows [row0, row0 + rows) of ds as memtype, read into or written from buf: 0 or -1. */
static int rows_io(hid_t ds, hsize_t row0, hsize_t rows, int width, hid_t memtype, void *buf, int write) {
    hid_t fsp = H5Dget_space(ds);
    if (fsp < 0) return -1;
    int nd = H5Sget_simple_extent_ndims(fsp) == 2 ? 2 : 1;
    hsize_t start[2] = {row0, 0}, count[2] = {rows, (hsize_t)width};
    hid_t msp = h5_check(H5Screate_simple(nd, count, NULL));
    int ok = H5Sselect_hyperslab(fsp, H5S_SELECT_SET, start, NULL, count, NULL) >= 0 &&
             (write ? H5Dwrite(ds, memtype, msp, fsp, H5P_DEFAULT, buf)
                    : H5Dread(ds, memtype, msp, fsp, H5P_DEFAULT, buf)) >= 0;
    H5Sclose(msp);
    H5Sclose(fsp);
    return ok ? 0 : -1;
}

int h5_ds_append_row(hid_t ds, hsize_t row, int width, hid_t memtype, const void *buf) {
    hsize_t dims[2] = {row + 1, (hsize_t)width};
    if (H5Dset_extent(ds, dims) < 0) return -1;
    return rows_io(ds, row, 1, width, memtype, (void *)buf, 1);
}

int h5_ds_read_rows(hid_t ds, int64_t rows, int width, hid_t memtype, void *buf) {
    return rows <= 0 ? 0 : rows_io(ds, 0, (hsize_t)rows, width, memtype, buf, 0);
}

hid_t h5_fapl_latest(int locking) {
    hid_t fapl = h5_check(H5Pcreate(H5P_FILE_ACCESS));
    h5_check(H5Pset_libver_bounds(fapl, H5F_LIBVER_LATEST, H5F_LIBVER_LATEST));
    if (!locking) h5_check(H5Pset_file_locking(fapl, 0, 1));
    return fapl;
}
