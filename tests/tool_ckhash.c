/*
 * tool_ckhash: a bitwise fingerprint of every dataset in a checkpoint, for the
 * tests that require a change to leave results identical.
 *   tool_ckhash FILE   one line per dataset: "<path> <FNV-1a 64 of its bytes>"
 * Datasets are read in their stored type (float tensors, double state), in
 * name order within each group.
 */
#include <hdf5.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t fnv(const unsigned char *p, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ULL;
    return h;
}

static int failed = 0;

static herr_t visit(hid_t root, const char *name, const H5O_info_t *info, void *op) {
    (void)op;
    if (info->type != H5O_TYPE_DATASET) return 0;
    hid_t ds = H5Dopen2(root, name, H5P_DEFAULT);
    hid_t t = ds >= 0 ? H5Dget_type(ds) : -1;
    hid_t nt = t >= 0 ? H5Tget_native_type(t, H5T_DIR_ASCEND) : -1;
    hid_t sp = ds >= 0 ? H5Dget_space(ds) : -1;
    hssize_t n = sp >= 0 ? H5Sget_simple_extent_npoints(sp) : -1;
    size_t bytes = nt >= 0 && n >= 0 ? (size_t)n * H5Tget_size(nt) : 0;
    unsigned char *buf = malloc(bytes ? bytes : 1);
    if (ds < 0 || nt < 0 || n < 0 || !buf || H5Dread(ds, nt, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0) {
        fprintf(stderr, "tool_ckhash: cannot read /%s\n", name);
        failed = 1;
    } else {
        printf("/%s %016llx\n", name, (unsigned long long)fnv(buf, bytes));
    }
    free(buf);
    if (sp >= 0) H5Sclose(sp);
    if (nt >= 0) H5Tclose(nt);
    if (t >= 0) H5Tclose(t);
    if (ds >= 0) H5Dclose(ds);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: tool_ckhash FILE\n");
        return 2;
    }
    hid_t f = H5Fopen(argv[1], H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0) return 1;
    if (H5Ovisit2(f, H5_INDEX_NAME, H5_ITER_INC, visit, NULL, H5O_INFO_BASIC) < 0) failed = 1;
    H5Fclose(f);
    return failed;
}
