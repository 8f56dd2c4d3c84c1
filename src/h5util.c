/* h5util: HDF5 attribute helpers shared by ckpt and stats (see h5util.h). */
#include "infmoe/h5util.h"

#include <stdlib.h>
#include <string.h>

#include "infmoe/util.h"

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
