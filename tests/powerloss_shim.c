/*
 * Power-loss recorder for ckpt's tests (the idea of SQLite's test6.c, one
 * layer down): preloaded into a writer process (LD_PRELOAD), it records, in
 * order, every operation under $PLSIM_ROOT that matters for durability:
 *
 *   C <ino> <path>          a file was opened with O_CREAT
 *   F <ino> <blob> <path>   fsync/fdatasync of a regular file; <blob> holds its
 *                           content at that moment (what the disk then has)
 *   D <path>                fsync/fdatasync of a directory
 *   R <old> <new>           rename
 *   U <path>                unlink
 *   X <path>                rmdir
 *   M <ino> <path>          mkdir
 *   L <path>                link/symlink (not modelled: the test fails)
 *   S -                     sync/syncfs (not modelled: the test fails)
 *
 * Fields are separated by tabs, one record per line, appended to $PLSIM_LOG
 * with one write(2) each. tests/powerloss.py replays the log and builds the
 * state a power loss at any moment could leave: only fsynced file contents
 * and only directory entries whose directory was fsynced afterwards survive.
 *
 * The calls themselves are passed through unchanged (the shim only watches).
 * Build: cc -shared -fPIC -O1 -o powerloss_shim.so powerloss_shim.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static char root[PATH_MAX];
static size_t root_len;
static char blobs[PATH_MAX];
static int log_fd = -1;
static long blob_seq;

__attribute__((constructor)) static void plsim_init(void) {
    const char *r = getenv("PLSIM_ROOT"), *l = getenv("PLSIM_LOG"), *b = getenv("PLSIM_BLOBS");
    if (!r || !l || !b)
        return;
    snprintf(root, sizeof root, "%s", r);
    root_len = strlen(root);
    snprintf(blobs, sizeof blobs, "%s", b);
    log_fd = (int)syscall(SYS_openat, AT_FDCWD, l, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
}

static int watched(const char *path) {
    return log_fd >= 0 && strncmp(path, root, root_len) == 0 &&
           (path[root_len] == '/' || path[root_len] == '\0');
}

static void emit(const char *fmt, ...) {
    char buf[3 * PATH_MAX + 64];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n > 0 && (size_t)n < sizeof buf)
        syscall(SYS_write, log_fd, buf, (size_t)n);
}

/* The path an fd refers to now. */
static int fd_path(int fd, char *out) {
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, out, PATH_MAX - 1);
    if (n < 0)
        return -1;
    out[n] = '\0';
    return 0;
}

/* An absolute path for (dirfd, path); no normalisation (the writers use clean paths). */
static int resolve(int dirfd, const char *path, char *out) {
    if (path[0] == '/') {
        snprintf(out, PATH_MAX, "%s", path);
        return 0;
    }
    char base[PATH_MAX];
    if (dirfd == AT_FDCWD) {
        if (!getcwd(base, sizeof base))
            return -1;
    } else if (fd_path(dirfd, base) != 0) {
        return -1;
    }
    return snprintf(out, PATH_MAX, "%.2047s/%.2047s", base, path) < PATH_MAX ? 0 : -1;
}

static void created(int fd, int dirfd, const char *path) {
    char abs[PATH_MAX];
    struct stat st;
    if (fd < 0 || log_fd < 0 || resolve(dirfd, path, abs) != 0 || !watched(abs))
        return;
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode))
        emit("C\t%lu\t%s\n", (unsigned long)st.st_ino, abs);
}

#define REAL(name, type) \
    static type real_##name; \
    if (!real_##name) real_##name = (type)dlsym(RTLD_NEXT, #name)

typedef int (*open_t)(const char *, int, ...);
typedef int (*openat_t)(int, const char *, int, ...);

#define OPEN_BODY(name) \
    mode_t mode = 0; \
    if (flags & (O_CREAT | O_TMPFILE)) { \
        va_list ap; \
        va_start(ap, flags); \
        mode = va_arg(ap, mode_t); \
        va_end(ap); \
    } \
    REAL(name, open_t); \
    int fd = real_##name(path, flags, mode); \
    if (flags & O_CREAT) \
        created(fd, AT_FDCWD, path); \
    return fd;

int open(const char *path, int flags, ...) { OPEN_BODY(open) }
int open64(const char *path, int flags, ...) { OPEN_BODY(open64) }

#define OPENAT_BODY(name) \
    mode_t mode = 0; \
    if (flags & (O_CREAT | O_TMPFILE)) { \
        va_list ap; \
        va_start(ap, flags); \
        mode = va_arg(ap, mode_t); \
        va_end(ap); \
    } \
    REAL(name, openat_t); \
    int fd = real_##name(dirfd, path, flags, mode); \
    if (flags & O_CREAT) \
        created(fd, dirfd, path); \
    return fd;

int openat(int dirfd, const char *path, int flags, ...) { OPENAT_BODY(openat) }
int openat64(int dirfd, const char *path, int flags, ...) { OPENAT_BODY(openat64) }

int creat(const char *path, mode_t mode) { return open(path, O_CREAT | O_WRONLY | O_TRUNC, mode); }
int creat64(const char *path, mode_t mode) { return open64(path, O_CREAT | O_WRONLY | O_TRUNC, mode); }

/* Copies the file's content now to a new blob; returns its sequence number, or -1. */
static long snapshot(int fd) {
    long seq = __atomic_fetch_add(&blob_seq, 1, __ATOMIC_SEQ_CST);
    /* Reopened for reading: the writer's descriptor may be write-only. */
    char self[64];
    snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
    int in = (int)syscall(SYS_openat, AT_FDCWD, self, O_RDONLY | O_CLOEXEC);
    if (in < 0)
        return -1;
    char path[PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/%d-%ld", blobs, getpid(), seq);
    int out = (int)syscall(SYS_openat, AT_FDCWD, path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (out < 0) {
        syscall(SYS_close, in);
        return -1;
    }
    char buf[1 << 16];
    off_t off = 0;
    for (;;) {
        ssize_t n = (ssize_t)syscall(SYS_pread64, in, buf, sizeof buf, off);
        if (n <= 0)
            break;
        syscall(SYS_write, out, buf, (size_t)n);
        off += n;
    }
    syscall(SYS_close, out);
    syscall(SYS_close, in);
    return seq;
}

static int synced(int fd, int (*real)(int)) {
    char path[PATH_MAX];
    struct stat st;
    int watch = log_fd >= 0 && fd_path(fd, path) == 0 && watched(path) && fstat(fd, &st) == 0;
    long seq = -1;
    if (watch && S_ISREG(st.st_mode))
        seq = snapshot(fd);
    int rc = real(fd);
    if (rc == 0 && watch) {
        if (S_ISDIR(st.st_mode))
            emit("D\t%s\n", path);
        else if (S_ISREG(st.st_mode))
            emit("F\t%lu\t%s/%d-%ld\t%s\n", (unsigned long)st.st_ino, blobs, getpid(), seq, path);
    }
    return rc;
}

typedef int (*fd_t)(int);
int fsync(int fd) {
    REAL(fsync, fd_t);
    return synced(fd, real_fsync);
}
int fdatasync(int fd) {
    REAL(fdatasync, fd_t);
    return synced(fd, real_fdatasync);
}

static void renamed(int olddirfd, const char *old, int newdirfd, const char *new_) {
    char a[PATH_MAX], b[PATH_MAX];
    if (log_fd >= 0 && resolve(olddirfd, old, a) == 0 && resolve(newdirfd, new_, b) == 0 &&
        (watched(a) || watched(b)))
        emit("R\t%s\t%s\n", a, b);
}

typedef int (*rename_t)(const char *, const char *);
typedef int (*renameat_t)(int, const char *, int, const char *);
typedef int (*renameat2_t)(int, const char *, int, const char *, unsigned int);
int rename(const char *old, const char *new_) {
    REAL(rename, rename_t);
    int rc = real_rename(old, new_);
    if (rc == 0)
        renamed(AT_FDCWD, old, AT_FDCWD, new_);
    return rc;
}
int renameat(int od, const char *old, int nd, const char *new_) {
    REAL(renameat, renameat_t);
    int rc = real_renameat(od, old, nd, new_);
    if (rc == 0)
        renamed(od, old, nd, new_);
    return rc;
}
int renameat2(int od, const char *old, int nd, const char *new_, unsigned int flags) {
    REAL(renameat2, renameat2_t);
    int rc = real_renameat2(od, old, nd, new_, flags);
    if (rc == 0)
        renamed(od, old, nd, new_);
    return rc;
}

static void removed(int dirfd, const char *path, int dir) {
    char abs[PATH_MAX];
    if (log_fd >= 0 && resolve(dirfd, path, abs) == 0 && watched(abs))
        emit("%s\t%s\n", dir ? "X" : "U", abs);
}

typedef int (*unlink_t)(const char *);
typedef int (*unlinkat_t)(int, const char *, int);
int unlink(const char *path) {
    REAL(unlink, unlink_t);
    int rc = real_unlink(path);
    if (rc == 0)
        removed(AT_FDCWD, path, 0);
    return rc;
}
int unlinkat(int dirfd, const char *path, int flags) {
    REAL(unlinkat, unlinkat_t);
    int rc = real_unlinkat(dirfd, path, flags);
    if (rc == 0)
        removed(dirfd, path, flags & AT_REMOVEDIR);
    return rc;
}
int rmdir(const char *path) {
    REAL(rmdir, unlink_t);
    int rc = real_rmdir(path);
    if (rc == 0)
        removed(AT_FDCWD, path, 1);
    return rc;
}

static void made_dir(int dirfd, const char *path) {
    char abs[PATH_MAX];
    struct stat st;
    if (log_fd >= 0 && resolve(dirfd, path, abs) == 0 && watched(abs) && stat(abs, &st) == 0)
        emit("M\t%lu\t%s\n", (unsigned long)st.st_ino, abs);
}

typedef int (*mkdir_t)(const char *, mode_t);
typedef int (*mkdirat_t)(int, const char *, mode_t);
int mkdir(const char *path, mode_t mode) {
    REAL(mkdir, mkdir_t);
    int rc = real_mkdir(path, mode);
    if (rc == 0)
        made_dir(AT_FDCWD, path);
    return rc;
}
int mkdirat(int dirfd, const char *path, mode_t mode) {
    REAL(mkdirat, mkdirat_t);
    int rc = real_mkdirat(dirfd, path, mode);
    if (rc == 0)
        made_dir(dirfd, path);
    return rc;
}

static void linked(int dirfd, const char *path) {
    char abs[PATH_MAX];
    if (log_fd >= 0 && resolve(dirfd, path, abs) == 0 && watched(abs))
        emit("L\t%s\n", abs);
}
typedef int (*link_t)(const char *, const char *);
typedef int (*linkat_t)(int, const char *, int, const char *, int);
typedef int (*symlinkat_t)(const char *, int, const char *);
int link(const char *old, const char *new_) {
    REAL(link, link_t);
    int rc = real_link(old, new_);
    if (rc == 0)
        linked(AT_FDCWD, new_);
    return rc;
}
int linkat(int od, const char *old, int nd, const char *new_, int flags) {
    REAL(linkat, linkat_t);
    int rc = real_linkat(od, old, nd, new_, flags);
    if (rc == 0)
        linked(nd, new_);
    return rc;
}
int symlink(const char *target, const char *path) {
    REAL(symlink, link_t);
    int rc = real_symlink(target, path);
    if (rc == 0)
        linked(AT_FDCWD, path);
    return rc;
}
int symlinkat(const char *target, int dirfd, const char *path) {
    REAL(symlinkat, symlinkat_t);
    int rc = real_symlinkat(target, dirfd, path);
    if (rc == 0)
        linked(dirfd, path);
    return rc;
}

typedef void (*sync_t)(void);
void sync(void) {
    REAL(sync, sync_t);
    real_sync();
    if (log_fd >= 0)
        emit("S\t-\n");
}
typedef int (*syncfs_t)(int);
int syncfs(int fd) {
    REAL(syncfs, syncfs_t);
    int rc = real_syncfs(fd);
    if (rc == 0 && log_fd >= 0)
        emit("S\t-\n");
    return rc;
}
