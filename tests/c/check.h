/* Checks shared by the C host programs: every failed check prints where and why (with the
 * library's last error message) and the program exits non-zero at the end. */
#ifndef RELORA_TEST_CHECK_H
#define RELORA_TEST_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "relora.h"

static int check_failures = 0;

/* The calling thread's last error message, in a static buffer. */
static inline const char *check_last_error(void) {
    static char buf[1024];
    size_t n = 0;
    if (relora_last_error_message(buf, sizeof buf, &n) != RELORA_STATUS_OK) {
        return "(relora_last_error_message failed)";
    }
    return buf;
}

static inline void check_fail(const char *file, int line, const char *what) {
    fprintf(stderr, "%s:%d: check failed: %s\n  last error: %s\n", file, line, what,
            check_last_error());
    check_failures++;
}

/* A condition that must hold. */
#define CHECK(cond)                                  \
    do {                                             \
        if (!(cond)) {                               \
            check_fail(__FILE__, __LINE__, #cond);   \
        }                                            \
    } while (0)

/* A call that must return RELORA_STATUS_OK. */
#define CHECK_OK(call)                                                          \
    do {                                                                        \
        relora_status check_st_ = (call);                                       \
        if (check_st_ != RELORA_STATUS_OK) {                                    \
            char check_what_[512];                                              \
            snprintf(check_what_, sizeof check_what_, "%s returned %d (%s)",    \
                     #call, (int)check_st_, relora_status_string(check_st_));   \
            check_fail(__FILE__, __LINE__, check_what_);                        \
        }                                                                       \
    } while (0)

/* A call that must fail with `expected` and leave a message containing `fragment`. */
#define CHECK_STATUS(call, expected, fragment)                                          \
    do {                                                                                \
        relora_status check_st_ = (call);                                               \
        if (check_st_ != (expected)) {                                                  \
            char check_what_[512];                                                      \
            snprintf(check_what_, sizeof check_what_, "%s returned %d, expected %s",    \
                     #call, (int)check_st_, #expected);                                 \
            check_fail(__FILE__, __LINE__, check_what_);                                \
        } else if (strstr(check_last_error(), (fragment)) == NULL) {                    \
            char check_what_[512];                                                      \
            snprintf(check_what_, sizeof check_what_,                                   \
                     "%s: message lacks \"%s\"", #call, (fragment));                    \
            check_fail(__FILE__, __LINE__, check_what_);                                \
        }                                                                               \
    } while (0)

/* Ends a test program: 0 only when every check passed. */
static inline int check_finish(const char *name) {
    if (check_failures != 0) {
        fprintf(stderr, "%s: %d check(s) failed\n", name, check_failures);
        return 1;
    }
    printf("%s: all checks passed\n", name);
    return 0;
}

/* Reads a whole file; exits on failure (the driver always provides it). */
static inline unsigned char *check_read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    unsigned char *data;
    long size;
    if (f == NULL) {
        fprintf(stderr, "cannot open %s\n", path);
        exit(2);
    }
    if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) <= 0 || fseek(f, 0, SEEK_SET) != 0) {
        fprintf(stderr, "cannot size %s\n", path);
        exit(2);
    }
    data = (unsigned char *)malloc((size_t)size);
    if (data == NULL || fread(data, 1, (size_t)size, f) != (size_t)size) {
        fprintf(stderr, "cannot read %s\n", path);
        exit(2);
    }
    fclose(f);
    *len = (size_t)size;
    return data;
}

#endif
