/* Data safety at the C API: a save or export never replaces what relora did not write (a user's
 * directory, a regular file, a checkpoint where an export goes), loading never hangs on files
 * that are not regular files (FIFOs, /dev/zero, /dev/urandom), the host state comes back byte
 * for byte, and the smaller answers are exact (the adapter rank's bound, the loss as computed,
 * pointer checks before the file system).
 *
 * usage: data_safety WORKDIR   (WORKDIR: an empty writable directory) */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "check.h"
#include "tiny.h"
#include "relora.h"

enum { VOCAB = 64, SEQ = 8, LEN = SEQ + 1, BATCH = 2 };

/* A pointer value the library must never write. */
#define SENTINEL ((void *)0x5e)

static const char *workdir;

/* `workdir/name` in a static buffer, valid until the next call of `at` (copy it to keep it). */
static const char *at(const char *name) {
    static char buf[2048];
    snprintf(buf, sizeof buf, "%s/%s", workdir, name);
    return buf;
}

/* `workdir/name` into `out`. */
static void path_of(char *out, size_t len, const char *name) {
    snprintf(out, len, "%s/%s", workdir, name);
}

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    if (f == NULL || fputs(text, f) < 0 || fclose(f) != 0) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(2);
    }
}

/* Whether the file at `path` holds exactly `text`. */
static int holds(const char *path, const char *text) {
    char buf[256];
    size_t n;
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        return 0;
    }
    n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    return strcmp(buf, text) == 0;
}

static int exists(const char *path) {
    struct stat st;
    return lstat(path, &st) == 0;
}

/* Entries of `dir` whose names start with '.' (other than . and ..): a save or export must
 * leave no hidden temporary or parked copy behind. */
static int hidden_entries(const char *dir) {
    int n = 0;
    struct dirent *e;
    DIR *d = opendir(dir);
    if (d == NULL) {
        return -1;
    }
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.' && strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) {
            fprintf(stderr, "hidden entry left in %s: %s\n", dir, e->d_name);
            n++;
        }
    }
    closedir(d);
    return n;
}

static relora_params *tiny_params(void) {
    return tiny_relora_params(VOCAB, SEQ, BATCH, 20, 1, 4, 2);
}

static void fill_tokens(int32_t *rows, size_t n, int salt) {
    size_t i;
    for (i = 0; i < n; i++) {
        rows[i] = (int32_t)((i * 7 + 3 + (size_t)salt) % VOCAB);
    }
}

/* A tiny trainer after two steps (adapters attached). */
static relora_trainer *trained(void) {
    relora_params *p = tiny_params();
    relora_trainer *t = NULL;
    int32_t rows[BATCH * LEN];
    int s;
    CHECK_OK(relora_trainer_new(p, &t));
    relora_params_free(p);
    for (s = 0; s < 2; s++) {
        fill_tokens(rows, BATCH * LEN, s);
        CHECK_OK(relora_trainer_step(t, rows, BATCH, LEN, NULL));
    }
    return t;
}

/* 1. A save replaces only an empty directory or relora's own checkpoint. */
static void save_replaces_only_its_own_checkpoints(relora_trainer *t) {
    char user[2048], file[2048], ckpt[2048], path[4096];
    path_of(user, sizeof user, "user");
    path_of(file, sizeof file, "file.txt");
    path_of(ckpt, sizeof ckpt, "ckpt");

    CHECK(mkdir(user, 0700) == 0);
    snprintf(path, sizeof path, "%s/sub", user);
    CHECK(mkdir(path, 0700) == 0);
    snprintf(path, sizeof path, "%s/sub/a.txt", user);
    write_file(path, "a");
    snprintf(path, sizeof path, "%s/notes.txt", user);
    write_file(path, "mine");
    CHECK_STATUS(relora_trainer_save(t, user, NULL), RELORA_STATUS_OUTPUT_EXISTS, "notes.txt");
    CHECK_STATUS(relora_trainer_save(t, user, NULL), RELORA_STATUS_OUTPUT_EXISTS, "/user: holds");
    CHECK(holds(path, "mine"));
    snprintf(path, sizeof path, "%s/sub/a.txt", user);
    CHECK(holds(path, "a"));
    snprintf(path, sizeof path, "%s/manifest.json", user);
    CHECK(!exists(path));

    write_file(file, "data");
    CHECK_STATUS(relora_trainer_save(t, file, NULL), RELORA_STATUS_OUTPUT_EXISTS,
                 "a regular file");
    CHECK(holds(file, "data"));

    /* An empty directory is taken; relora's own checkpoint is replaced. */
    CHECK(mkdir(ckpt, 0700) == 0);
    CHECK_OK(relora_trainer_save(t, ckpt, NULL));
    snprintf(path, sizeof path, "%s/manifest.json", ckpt);
    CHECK(exists(path));
    CHECK_OK(relora_trainer_save(t, ckpt, "{\"second\": true}"));
    /* ...but not once a user's file has been put into it. */
    snprintf(path, sizeof path, "%s/my-notes.txt", ckpt);
    write_file(path, "keep");
    CHECK_STATUS(relora_trainer_save(t, ckpt, NULL), RELORA_STATUS_OUTPUT_EXISTS, "my-notes.txt");
    CHECK(holds(path, "keep"));
    CHECK(unlink(path) == 0);
    CHECK(hidden_entries(workdir) == 0);
}

/* 1. An export replaces only relora's own export, and only when overwrite is asked for. */
static void export_replaces_only_its_own_exports(relora_trainer *t) {
    char hf[2048], path[4096];
    path_of(hf, sizeof hf, "hf");
    CHECK_STATUS(relora_trainer_export(t, at("user"), NULL, 0, true), RELORA_STATUS_OUTPUT_EXISTS,
                 "notes.txt");
    CHECK_STATUS(relora_trainer_export(t, at("file.txt"), NULL, 0, true),
                 RELORA_STATUS_OUTPUT_EXISTS, "file.txt");
    CHECK(holds(at("file.txt"), "data"));
    /* A checkpoint is not an export: never replaced by one. */
    CHECK_STATUS(relora_trainer_export(t, at("ckpt"), NULL, 0, true), RELORA_STATUS_OUTPUT_EXISTS,
                 "ckpt");
    snprintf(path, sizeof path, "%s/manifest.json", at("ckpt"));
    CHECK(exists(path));

    CHECK_OK(relora_trainer_export(t, hf, NULL, 0, false));
    CHECK_STATUS(relora_trainer_export(t, hf, NULL, 0, false), RELORA_STATUS_OUTPUT_EXISTS,
                 "overwrite = true");
    CHECK_OK(relora_trainer_export(t, hf, "bf16", 0, true));
    snprintf(path, sizeof path, "%s/config.json", hf);
    CHECK(exists(path));
    snprintf(path, sizeof path, "%s/README.md", hf);
    write_file(path, "my model card");
    CHECK_STATUS(relora_trainer_export(t, hf, NULL, 0, true), RELORA_STATUS_OUTPUT_EXISTS,
                 "README.md");
    CHECK(holds(path, "my model card"));
    CHECK(hidden_entries(workdir) == 0);
}

/* 2. Files that are not regular files are refused at once, naming the file. */
static void hostile_checkpoint_files_are_refused_without_hanging(relora_trainer *t) {
    static const struct {
        const char *name;
        const char *file;
        const char *link_to; /* NULL: a FIFO */
    } cases[] = {
        {"ck-zero", "params.safetensors", "/dev/zero"},
        {"ck-urandom", "params.safetensors", "/dev/urandom"},
        {"ck-fifo", "params.safetensors", NULL},
        {"ck-manifest-fifo", "manifest.json", NULL},
        {"ck-optimizer-fifo", "optimizer.safetensors", NULL},
    };
    size_t i;
    char path[4096];
    relora_trainer *loaded;
    /* A hang would end the program here (SIGALRM), failing the test. */
    alarm(120);
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char dir[2048];
        path_of(dir, sizeof dir, cases[i].name);
        CHECK_OK(relora_trainer_save(t, dir, NULL));
        snprintf(path, sizeof path, "%s/%s", dir, cases[i].file);
        CHECK(unlink(path) == 0);
        if (cases[i].link_to != NULL) {
            CHECK(symlink(cases[i].link_to, path) == 0);
        } else {
            CHECK(mkfifo(path, 0600) == 0);
        }
        loaded = (relora_trainer *)SENTINEL;
        CHECK_STATUS(relora_trainer_load(dir, NULL, &loaded), RELORA_STATUS_CHECKPOINT,
                     cases[i].file);
        CHECK(loaded == (relora_trainer *)SENTINEL);
    }
    loaded = (relora_trainer *)SENTINEL;
    CHECK_STATUS(relora_trainer_load(at("file.txt"), NULL, &loaded), RELORA_STATUS_CHECKPOINT,
                 "not a checkpoint directory");
    CHECK_STATUS(relora_trainer_load(at("nothing-here"), NULL, &loaded),
                 RELORA_STATUS_CHECKPOINT, "nothing-here");
    CHECK(loaded == (relora_trainer *)SENTINEL);
    alarm(0);
}

/* 3. The host state comes back exactly as given. */
static void host_state_comes_back_byte_for_byte(relora_trainer *t) {
    static const char state[] =
        "{\"zeta\": 1,   \"alpha\": [123456789012345678901234567890, 1.50, -0.0],\n"
        "  \"cursor\": {\"file\": \"shard-07.bin\", \"offset\": 18446744073709551616},"
        " \"s\": \"caf\\u00e9\"}";
    relora_trainer *loaded = NULL;
    char buf[512];
    size_t n = 0;
    CHECK_OK(relora_trainer_save(t, at("hs"), state));
    CHECK_OK(relora_trainer_load(at("hs"), NULL, &loaded));
    CHECK_OK(relora_trainer_host_state(loaded, buf, sizeof buf, &n));
    CHECK(n == strlen(state));
    CHECK(strcmp(buf, state) == 0);
    relora_trainer_free(loaded);
    CHECK_STATUS(relora_trainer_save(t, at("hs-bad"), "{\"cursor\": 12,"),
                 RELORA_STATUS_INVALID_ARGUMENT, "not valid JSON");
    CHECK(!exists(at("hs-bad")));
}

/* 4. The adapter rank is bounded by the projections. */
static void an_adapter_rank_beyond_the_projections_is_invalid(void) {
    relora_params *p = tiny_params();
    relora_trainer *t = (relora_trainer *)SENTINEL;
    CHECK_OK(relora_params_set_int(p, "lora_rank", 100000));
    CHECK_STATUS(relora_params_validate(p), RELORA_STATUS_INVALID_CONFIG, "lora_rank 100000");
    CHECK_STATUS(relora_trainer_new(p, &t), RELORA_STATUS_INVALID_CONFIG, "exceeds 32");
    CHECK(t == (relora_trainer *)SENTINEL);
    relora_params_free(p);
}

/* 4. The step's loss is the value computed, not a float rounding of it. */
static void the_step_loss_is_reported_as_computed(void) {
    relora_params *p = tiny_params();
    relora_trainer *t = NULL;
    relora_step_stats stats;
    int32_t rows[BATCH * LEN];
    double eval = 0;
    CHECK_OK(relora_params_set(p, "dtype", "f64"));
    CHECK_OK(relora_trainer_new(p, &t));
    relora_params_free(p);
    fill_tokens(rows, BATCH * LEN, 5);
    CHECK_OK(relora_trainer_eval(t, rows, BATCH, LEN, &eval));
    memset(&stats, 0, sizeof stats);
    stats.struct_size = sizeof stats;
    CHECK_OK(relora_trainer_step(t, rows, BATCH, LEN, &stats));
    /* An f64 model's loss has more digits than a float holds. */
    CHECK((double)(float)stats.loss != stats.loss);
    CHECK(fabs(stats.loss - eval) < 1e-12);
    relora_trainer_free(t);
}

/* 4. Pointer arguments are checked before the file system is touched. */
static void pointers_are_checked_first(void) {
    relora_params *p = tiny_params();
    CHECK_STATUS(relora_params_load_file(NULL, at("no-such-file.json")),
                 RELORA_STATUS_NULL_PARAMETER, "params");
    CHECK_STATUS(relora_params_load_file(p, NULL), RELORA_STATUS_NULL_PARAMETER, "path");
    CHECK_STATUS(relora_params_load_file(p, at("no-such-file.json")), RELORA_STATUS_IO,
                 "no-such-file.json");
    relora_params_free(p);
}

int main(int argc, char **argv) {
    relora_trainer *t;
    if (argc != 2) {
        fprintf(stderr, "usage: %s WORKDIR\n", argv[0]);
        return 2;
    }
    workdir = argv[1];
    t = trained();
    save_replaces_only_its_own_checkpoints(t);
    export_replaces_only_its_own_exports(t);
    hostile_checkpoint_files_are_refused_without_hanging(t);
    host_state_comes_back_byte_for_byte(t);
    relora_trainer_free(t);
    an_adapter_rank_beyond_the_projections_is_invalid();
    the_step_loss_is_reported_as_computed();
    pointers_are_checked_first();
    return check_finish("data_safety");
}
