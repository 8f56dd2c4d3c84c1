/*
 * tool_tamper: damage a checkpoint the way disks and crashes do, for the tests.
 *   tool_tamper FILE flip DATASET     flip one byte inside DATASET's first chunk
 *   tool_tamper FILE drop-attr NAME   delete the root attribute NAME
 */
#define _POSIX_C_SOURCE 200809L
#include <fcntl.h>
#include <hdf5.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: tool_tamper FILE flip DATASET | FILE drop-attr NAME\n");
        return 2;
    }
    if (strcmp(argv[2], "drop-attr") == 0) {
        hid_t f = H5Fopen(argv[1], H5F_ACC_RDWR, H5P_DEFAULT);
        if (f < 0 || H5Adelete(f, argv[3]) < 0) return 1;
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
