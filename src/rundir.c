/* rundir: the run directory, written relative to one descriptor, never through links (see rundir.h). */
#define _GNU_SOURCE
#include "infmoe/rundir.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "infmoe/util.h"

#define LOCK_NAME ".lock"

/* Files and directories infmoe writes in a run directory, checked when it is opened. */
static const char *const FILES[] = {"latest",    "latest.tmp", "config.yaml", "config.yaml.tmp",
                                    "train.log", "stats.h5",   "stats.h5.old"};

static int fail_errno(char *err, size_t cap, const char *what, const run_dir *r, const char *name) {
    snprintf(err, cap, "%s %s/%s: %s", what, r->path, name, strerror(errno));
    return -1;
}

/* A step_NNNNNN (tmp 0) or step_NNNNNN.tmp (tmp 1) name: its step, or -1. */
static int64_t step_of(const char *name, int tmp) {
    if (strncmp(name, "step_", 5) != 0) return -1;
    const char *p = name + 5;
    int64_t s = 0;
    int digits = 0;
    for (; *p >= '0' && *p <= '9' && digits < 18; p++, digits++) s = s * 10 + (*p - '0');
    if (digits < 6) return -1;
    return strcmp(p, tmp ? ".tmp" : "") == 0 ? s : -1;
}

int rundir_check(const run_dir *r, const char *name, int want_dir, char *err, size_t cap) {
    struct stat st;
    if (fstatat(r->fd, name, &st, AT_SYMLINK_NOFOLLOW) != 0)
        return errno == ENOENT ? 0 : fail_errno(err, cap, "cannot inspect", r, name);
    if (S_ISLNK(st.st_mode)) {
        snprintf(err, cap, "%s/%s is a symbolic link where infmoe writes its own %s; infmoe "
                 "never writes through links in a run directory: remove the link",
                 r->path, name, want_dir ? "directory" : "file");
        return -1;
    }
    if (!want_dir && S_ISREG(st.st_mode) && st.st_nlink > 1) {
        snprintf(err, cap, "%s/%s has %lu hard links, but infmoe writes its own file there (writing "
                 "would change the other names too): remove it", r->path, name,
                 (unsigned long)st.st_nlink);
        return -1;
    }
    if (want_dir ? !S_ISDIR(st.st_mode) : !S_ISREG(st.st_mode)) {
        snprintf(err, cap, "%s/%s is not a %s, but infmoe writes its own %s there: move it away",
                 r->path, name, want_dir ? "directory" : "regular file",
                 want_dir ? "directory" : "file");
        return -1;
    }
    return 0;
}

/* Remove everything in the open directory dfd (closed here); links are unlinked, not followed. */
static int empty_dir(int dfd) {
    DIR *dir = fdopendir(dfd);
    if (!dir) {
        close(dfd);
        return -1;
    }
    int rc = 0;
    struct dirent *e;
    while ((e = readdir(dir))) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        struct stat st;
        if (fstatat(dfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
            rc = -1;
            continue;
        }
        if (S_ISDIR(st.st_mode)) {
            int sub = openat(dfd, e->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (sub < 0 || empty_dir(sub) != 0 || unlinkat(dfd, e->d_name, AT_REMOVEDIR) != 0) rc = -1;
        } else if (unlinkat(dfd, e->d_name, 0) != 0) {
            rc = -1;
        }
    }
    closedir(dir);
    return rc;
}

int rundir_remove(const run_dir *r, const char *name, int want_dir, char *err, size_t cap) {
    if (rundir_check(r, name, want_dir, err, cap) != 0) return -1;
    if (!want_dir) return unlinkat(r->fd, name, 0) == 0 || errno == ENOENT ? 0 : fail_errno(err, cap, "cannot remove", r, name);
    int dfd = openat(r->fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dfd < 0) return errno == ENOENT ? 0 : fail_errno(err, cap, "cannot open", r, name);
    if (empty_dir(dfd) != 0 || unlinkat(r->fd, name, AT_REMOVEDIR) != 0)
        return fail_errno(err, cap, "cannot remove", r, name);
    return 0;
}

/* HDF5 opens files by path: path/name must lead to the directory `name` here. */
static int leads_here(const run_dir *r, const char *name, char *err, size_t cap) {
    struct stat here, by_path;
    char path[2100];
    snprintf(path, sizeof path, "%s/%s", r->path, name);
    if (fstatat(r->fd, name, &here, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISDIR(here.st_mode) ||
        stat(path, &by_path) != 0 || here.st_dev != by_path.st_dev || here.st_ino != by_path.st_ino) {
        snprintf(err, cap, "%s: the path no longer leads to the directory infmoe created in %s "
                 "(was %s moved or replaced while the run was writing?)", path, r->path, r->path);
        return -1;
    }
    return 0;
}

int rundir_mkdir(const run_dir *r, const char *name, char *err, size_t cap) {
    if (mkdirat(r->fd, name, 0755) != 0) return fail_errno(err, cap, "cannot create", r, name);
    return leads_here(r, name, err, cap);
}

int rundir_check_written(const run_dir *r, const char *name, const char *file, char *err, size_t cap) {
    if (leads_here(r, name, err, cap) != 0) return -1;
    int dfd = openat(r->fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dfd < 0) return fail_errno(err, cap, "cannot open", r, name);
    struct stat st;
    int ok = fstatat(dfd, file, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode) && st.st_nlink == 1;
    close(dfd);
    if (!ok) {
        snprintf(err, cap, "%s/%s/%s is not the file infmoe wrote (a link, or not a regular file): "
                 "not publishing it", r->path, name, file);
        return -1;
    }
    return 0;
}

int rundir_publish_dir(const run_dir *r, const char *from, const char *to, char *err, size_t cap) {
    if (rundir_check(r, to, 1, err, cap) != 0) return -1;
    if (renameat2(r->fd, from, r->fd, to, RENAME_EXCHANGE) == 0) {
        rundir_sync(r, NULL);
        return rundir_remove(r, from, 1, err, cap); /* now the older save */
    }
    if (errno != ENOENT && errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP)
        return fail_errno(err, cap, "cannot replace", r, to);
    if (errno != ENOENT && rundir_remove(r, to, 1, err, cap) != 0) return -1;
    return rundir_rename(r, from, to, err, cap);
}

int rundir_reserve(const run_dir *r, const char *name, uint64_t bytes, char *err, size_t cap) {
    int dfd = openat(r->fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (dfd < 0) return fail_errno(err, cap, "cannot open", r, name);
    int fd = openat(dfd, ".space", O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    int rc = 0;
    if (fd < 0) {
        rc = fail_errno(err, cap, "cannot create a file in", r, name);
    } else {
        if (fallocate(fd, 0, 0, (off_t)bytes) != 0 && errno != EOPNOTSUPP && errno != ENOSYS) {
            snprintf(err, cap, "cannot reserve %.1f MB for the checkpoint in %s/%s: %s",
                     (double)bytes / 1e6, r->path, name, strerror(errno));
            rc = -1;
        }
        close(fd);
        unlinkat(dfd, ".space", 0);
    }
    close(dfd);
    return rc;
}

void rundir_sync(const run_dir *r, const char *name) {
    int fd = name ? openat(r->fd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC) : dup(r->fd);
    if (fd < 0) return;
    fsync(fd);
    close(fd);
}

int rundir_rename(const run_dir *r, const char *from, const char *to, char *err, size_t cap) {
    if (renameat(r->fd, from, r->fd, to) != 0) {
        snprintf(err, cap, "cannot rename %s/%s to %s: %s", r->path, from, to, strerror(errno));
        return -1;
    }
    rundir_sync(r, NULL);
    return 0;
}

/* Write all of buf to fd: 0, or -1 with errno. */
static int write_all(int fd, const char *buf, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, buf, n);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) return -1;
        buf += w;
        n -= (size_t)w;
    }
    return 0;
}

int rundir_replace(const run_dir *r, const char *name, const char *text, char *err, size_t cap) {
    char tmp[256];
    snprintf(tmp, sizeof tmp, "%s.tmp", name);
    if (rundir_check(r, name, 0, err, cap) != 0 || rundir_remove(r, tmp, 0, err, cap) != 0) return -1;
    int fd = openat(r->fd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0) return fail_errno(err, cap, "cannot create", r, tmp);
    int ok = write_all(fd, text, strlen(text)) == 0 && fsync(fd) == 0;
    int saved = errno;
    if (close(fd) != 0 && ok) {
        ok = 0;
        saved = errno;
    }
    if (!ok) {
        unlinkat(r->fd, tmp, 0);
        errno = saved;
        return fail_errno(err, cap, "cannot write", r, tmp);
    }
    return rundir_rename(r, tmp, name, err, cap);
}

FILE *rundir_append(const run_dir *r, const char *name, char *err, size_t cap) {
    if (rundir_check(r, name, 0, err, cap) != 0) return NULL;
    int fd = openat(r->fd, name, O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
    FILE *f = fd < 0 ? NULL : fdopen(fd, "a");
    if (!f) {
        fail_errno(err, cap, "cannot open for appending", r, name);
        if (fd >= 0) close(fd);
    }
    return f;
}

/* A listing of directory dirfd from its start (a dup would share the read position). */
static DIR *list_dir(int dirfd) {
    int fd = openat(dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *dir = fd < 0 ? NULL : fdopendir(fd);
    if (!dir && fd >= 0) close(fd);
    return dir;
}

int rundir_steps(int dirfd, int64_t **steps) {
    *steps = NULL;
    DIR *dir = list_dir(dirfd);
    if (!dir) return 0;
    int n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(dir))) {
        int64_t s = step_of(e->d_name, 0);
        struct stat st;
        if (s < 0 || fstatat(dirfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISDIR(st.st_mode)) continue;
        if (n == cap) *steps = xrealloc(*steps, sizeof(int64_t) * (size_t)(cap = cap ? 2 * cap : 16));
        (*steps)[n++] = s;
    }
    closedir(dir);
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && (*steps)[j - 1] > (*steps)[j]; j--) {
            int64_t t = (*steps)[j];
            (*steps)[j] = (*steps)[j - 1];
            (*steps)[j - 1] = t;
        }
    return n;
}

int rundir_latest(int dirfd, char *name, size_t cap) {
    int fd = openat(dirfd, "latest", O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) return 0;
    if (fd < 0) {
        snprintf(name, cap, "cannot read it: %s", strerror(errno));
        return -1;
    }
    char line[64] = "";
    ssize_t n = read(fd, line, sizeof line - 1);
    close(fd);
    line[n > 0 ? n : 0] = '\0';
    line[strcspn(line, "\n")] = '\0';
    struct stat st;
    if (step_of(line, 0) < 0 || fstatat(dirfd, line, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISDIR(st.st_mode)) {
        snprintf(name, cap, "it names '%.40s', which is not a checkpoint directory beside it", line);
        return -1;
    }
    snprintf(name, cap, "%s", line);
    return 1;
}

/* Every name infmoe writes is what infmoe would have put there (rundir_check). */
static int check_names(const run_dir *r, char *err, size_t cap) {
    for (size_t i = 0; i < sizeof FILES / sizeof FILES[0]; i++)
        if (rundir_check(r, FILES[i], 0, err, cap) != 0) return -1;
    DIR *dir = list_dir(r->fd);
    if (!dir) return fail_errno(err, cap, "cannot list", r, ".");
    int rc = 0;
    struct dirent *e;
    while (rc == 0 && (e = readdir(dir)))
        if (step_of(e->d_name, 0) >= 0 || step_of(e->d_name, 1) >= 0) rc = rundir_check(r, e->d_name, 1, err, cap);
    closedir(dir);
    return rc;
}

/* Take the run's lock on .lock; on a lock held elsewhere, name the holder from the file. */
static int take_lock(run_dir *r, char *err, size_t cap) {
    if (rundir_check(r, LOCK_NAME, 0, err, cap) != 0) return -1;
    r->lock_fd = openat(r->fd, LOCK_NAME, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (r->lock_fd < 0) return fail_errno(err, cap, "cannot create", r, LOCK_NAME);
    if (flock(r->lock_fd, LOCK_EX | LOCK_NB) != 0) {
        if (errno != EWOULDBLOCK) {
            /* a file system without flock (some Lustre and NFS mounts): run unprotected, and say so */
            fprintf(stderr, "infmoe: warning: cannot lock %s/%s (%s): nothing stops a second run "
                    "from writing into %s\n", r->path, LOCK_NAME, strerror(errno), r->path);
            return 0;
        }
        char holder[256] = "";
        ssize_t n = pread(r->lock_fd, holder, sizeof holder - 1, 0);
        holder[n > 0 ? n : 0] = '\0';
        holder[strcspn(holder, "\n")] = '\0';
        snprintf(err, cap, "output.dir %s is in use by another run (%s holds its %s): wait for "
                 "it to end or choose another output.dir", r->path,
                 holder[0] ? holder : "a process", LOCK_NAME);
        return -1;
    }
    /* Who holds it, for the message above; failing to record it (a full disk) costs only that. */
    char me[256], host[128] = "?";
    gethostname(host, sizeof host - 1);
    int len = snprintf(me, sizeof me, "pid %ld on %s\n", (long)getpid(), host);
    if (ftruncate(r->lock_fd, 0) == 0) (void)!pwrite(r->lock_fd, me, (size_t)len, 0);
    return 0;
}

void rundir_open(run_dir *r, const char *path, const dist_ctx *d) {
    char err[2048] = "";
    snprintf(r->path, sizeof r->path, "%s", path);
    r->fd = r->lock_fd = -1;
    if (d->rank == 0) {
        if (mkdir_p(path) != 0) {
            snprintf(err, sizeof err, "cannot create the run directory %s: %s", path, strerror(errno));
        } else if ((r->fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0) {
            snprintf(err, sizeof err, "cannot open the run directory %s: %s", path, strerror(errno));
        } else if (take_lock(r, err, sizeof err) == 0) {
            check_names(r, err, sizeof err);
        }
    }
    dist_exit_if_error(d, err);
}

void rundir_close(run_dir *r) {
    if (r->lock_fd >= 0) close(r->lock_fd); /* closing the last descriptor drops the flock */
    if (r->fd >= 0) close(r->fd);
    r->fd = r->lock_fd = -1;
}
