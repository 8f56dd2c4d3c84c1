/*
 * tool_tamper: damage a checkpoint the way disks and crashes do, for the tests.
 *   tool_tamper FILE flip DATASET     flip one byte inside DATASET's first chunk
 *   tool_tamper FILE drop-attr NAME   delete the root attribute NAME
 *   tool_tamper FILE set-attr NAME V  rewrite the root int64 attribute NAME as V (a flipped
 *                                     bit that the file's own structure does not catch)
 *   tool_tamper FILE nan DATASET      write nan and inf over DATASET's first two floats
 *                                     (through HDF5, so its checksum stays valid)
 */
#define _POSIX_C_SOURCE 200809L
#include <fcntl.h>
#include <hdf5.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int set = argc == 5 && strcmp(argv[2], "set-attr") == 0;
    if (argc != 4 && !set) {
        fprintf(stderr, "usage: tool_tamper FILE flip DATASET | FILE drop-attr NAME | "
                        "FILE set-attr NAME VALUE | FILE nan DATASET\n");
        return 2;
    }
    if (strcmp(argv[2], "drop-attr") == 0) {
        hid_t f = H5Fopen(argv[1], H5F_ACC_RDWR, H5P_DEFAULT);
        if (f < 0 || H5Adelete(f, argv[3]) < 0) return 1;
        return H5Fclose(f) < 0;
    }
    if (set) {
        int64_t v = strtoll(argv[4], NULL, 10);
        hid_t f = H5Fopen(argv[1], H5F_ACC_RDWR, H5P_DEFAULT);
        hid_t a = f < 0 ? -1 : H5Aopen(f, argv[3], H5P_DEFAULT);
        if (a < 0 || H5Awrite(a, H5T_NATIVE_INT64, &v) < 0) return 1;
        H5Aclose(a);
        return H5Fclose(f) < 0;
    }
    if (strcmp(argv[2], "nan") == 0) {
        float bad[2] = {NAN, INFINITY};
        hsize_t start[8] = {0}, count[8] = {0}, two = 2;
        hid_t f = H5Fopen(argv[1], H5F_ACC_RDWR, H5P_DEFAULT);
        hid_t ds = f < 0 ? -1 : H5Dopen2(f, argv[3], H5P_DEFAULT);
        if (ds < 0) return 1;
        hid_t fsp = H5Dget_space(ds);
        int nd = H5Sget_simple_extent_ndims(fsp);
        for (int i = 0; i < nd; i++) count[i] = 1;
        count[nd - 1] = 2;
        hid_t msp = H5Screate_simple(1, &two, NULL);
        if (H5Sselect_hyperslab(fsp, H5S_SELECT_SET, start, NULL, count, NULL) < 0 ||
            H5Dwrite(ds, H5T_NATIVE_FLOAT, msp, fsp, H5P_DEFAULT, bad) < 0)
            return 1;
        H5Sclose(msp);
        H5Sclose(fsp);
        H5Dclose(ds);
        return H5Fclose(f) < 0;
    }
    hid_t f = H5Fopen(argv[1], H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0) return 1;
    hid_t ds = H5Dopen2(f, argv[3], H5P_DEFAULT);
    if (ds < 0) return 1;
    hid_t sp = H5Dget_space(ds);
    hsize_t offset[8] = {0}, size = 0;
    haddr_t addr = 0;
    unsigned mask = 0;
    if (H5Dget_chunk_info(ds, sp, 0, offset, &mask, &addr, &size) < 0) return 1;
    H5Sclose(sp);
    H5Dclose(ds);
    H5Fclose(f);
    int fd = open(argv[1], O_RDWR);
    unsigned char b;
    off_t at = (off_t)(addr + size / 2);
    if (fd < 0 || pread(fd, &b, 1, at) != 1) return 1;
    b ^= 0x5a;
    if (pwrite(fd, &b, 1, at) != 1) return 1;
    return close(fd) != 0;
}
