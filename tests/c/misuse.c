/* Misuse of the C API: NULL handles and outputs, zero and mismatched lengths, token ids out of
 * range, unknown keys and bad values, calls in the wrong state, calls after an error, re-entrant
 * calls from a callback, and freed or foreign handles. Every misuse must give the right status
 * and a useful message, leave outputs untouched, and never crash.
 *
 * usage: misuse WORKDIR */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "tiny.h"
#include "relora.h"

enum { VOCAB = 64, SEQ = 8, LEN = SEQ + 1, BATCH = 2 };

/* A pointer value the library must never write or follow. */
#define SENTINEL ((void *)0x5e)

static relora_params *tiny_params(void) {
    return tiny_relora_params(VOCAB, SEQ, BATCH, 30, 3, 4, 2);
}

static void fill_tokens(int32_t *rows, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) {
        rows[i] = (int32_t)((i * 7 + 3) % VOCAB);
    }
}

static void misuse_errors_and_versions(void) {
    char small[8];
    size_t n = 99;
    relora_params *p = NULL;
    /* Produce an error to read back. */
    CHECK_STATUS(relora_params_new(NULL), RELORA_STATUS_NULL_PARAMETER, "'out' is NULL");
    CHECK(relora_last_error_length() > 10);
    CHECK(relora_last_error_message(NULL, 10, &n) == RELORA_STATUS_NULL_PARAMETER);
    CHECK(relora_last_error_message(small, 0, &n) == RELORA_STATUS_INVALID_ARGUMENT);
    CHECK(n == 99);
    CHECK(relora_last_error_message(small, sizeof small, &n) == RELORA_STATUS_OK);
    CHECK(n == sizeof small - 1 && strlen(small) == n); /* truncated, NUL-terminated */
    CHECK(relora_last_error_message(small, sizeof small, NULL) == RELORA_STATUS_OK);
    CHECK(strcmp(relora_status_string(RELORA_STATUS_INVALID_ARGUMENT), "invalid argument") == 0);
    CHECK(strcmp(relora_status_string(12345), "unknown status") == 0);
    /* A success clears the message. */
    CHECK_OK(relora_params_new(&p));
    CHECK(relora_last_error_length() == 0);
    relora_params_free(p);
}

static void misuse_params(const char *workdir) {
    relora_params *p = tiny_params();
    relora_params *clone = (relora_params *)SENTINEL;
    relora_trainer *t = (relora_trainer *)SENTINEL;
    char buf[64], path[4096];
    size_t n = 1234;
    int64_t iv = -1;
    double fv = -1;
    const char bad_utf8[] = {'l', (char)0xff, 'r', 0};
    FILE *f;

    CHECK_STATUS(relora_params_set(NULL, "lr", "0.1"), RELORA_STATUS_NULL_PARAMETER, "params");
    CHECK_STATUS(relora_params_set(p, NULL, "0.1"), RELORA_STATUS_NULL_PARAMETER, "key");
    CHECK_STATUS(relora_params_set(p, "lr", NULL), RELORA_STATUS_NULL_PARAMETER, "value");
    CHECK_STATUS(relora_params_set(p, bad_utf8, "1"), RELORA_STATUS_INVALID_ARGUMENT, "UTF-8");
    CHECK_STATUS(relora_params_set(p, "learning_rate", "0.1"), RELORA_STATUS_UNKNOWN_PARAM,
                 "learning_rate");
    CHECK_STATUS(relora_params_set(p, "lr", "fast"), RELORA_STATUS_INVALID_PARAM, "fast");
    CHECK_STATUS(relora_params_set(p, "mode", "sparse"), RELORA_STATUS_INVALID_PARAM, "sparse");
    CHECK_STATUS(relora_params_set(p, "reset_mode", "random:2"), RELORA_STATUS_INVALID_PARAM,
                 "reset_mode");
    CHECK_STATUS(relora_params_set(p, "device", "tpu:0"), RELORA_STATUS_INVALID_PARAM, "cuda:N");
    CHECK_STATUS(relora_params_set(p, "preset", "7b"), RELORA_STATUS_INVALID_PARAM, "tiny");
    CHECK_STATUS(relora_params_set_int(p, "steps", -5), RELORA_STATUS_INVALID_PARAM, "steps");
    CHECK_STATUS(relora_params_set_int(p, "mode", 1), RELORA_STATUS_INVALID_PARAM,
                 "relora_params_set)");
    CHECK_STATUS(relora_params_set_float(p, "steps", 1.5), RELORA_STATUS_INVALID_PARAM,
                 "integer");
    CHECK_STATUS(relora_params_set_float(p, "lr", NAN), RELORA_STATUS_INVALID_PARAM, "finite");
    CHECK_STATUS(relora_params_set_bool(p, "lr", true), RELORA_STATUS_INVALID_PARAM, "real");
    CHECK_STATUS(relora_params_set_int(p, "nope", 1), RELORA_STATUS_UNKNOWN_PARAM, "nope");
    /* Nothing above changed the params. */
    CHECK_OK(relora_params_get_int(p, "steps", &iv));
    CHECK(iv == 30);
    CHECK_OK(relora_params_get_float(p, "lr", &fv));
    CHECK(fabs(fv - 2e-3) < 1e-12);

    /* Text outputs: size query, too small (nothing written), NULL out_len, unknown key. */
    CHECK_OK(relora_params_get(p, "target_modules", NULL, 0, &n));
    CHECK(n > 20);
    memset(buf, 'x', sizeof buf);
    CHECK_STATUS(relora_params_get(p, "target_modules", buf, 4, &n),
                 RELORA_STATUS_BUFFER_TOO_SMALL, "bytes");
    CHECK(buf[0] == 'x' && n > 20);
    CHECK_STATUS(relora_params_get(p, "target_modules", buf, sizeof buf, NULL),
                 RELORA_STATUS_NULL_PARAMETER, "out_len");
    CHECK_STATUS(relora_params_get(p, "target_modules", NULL, 10, &n),
                 RELORA_STATUS_NULL_PARAMETER, "buf");
    CHECK_STATUS(relora_params_get(p, "bogus", buf, sizeof buf, &n), RELORA_STATUS_UNKNOWN_PARAM,
                 "bogus");
    CHECK_STATUS(relora_params_get_int(p, "lr", &iv), RELORA_STATUS_INVALID_PARAM, "integer");
    CHECK_STATUS(relora_params_get_int(p, "steps", NULL), RELORA_STATUS_NULL_PARAMETER, "out");

    /* The key list: every key is settable from its own text form. */
    {
        size_t count = 0, k;
        char key[64], value[512];
        CHECK_OK(relora_params_key_count(&count));
        CHECK(count > 30);
        for (k = 0; k < count; k++) {
            CHECK_OK(relora_params_key_name(k, key, sizeof key, &n));
            if (strcmp(key, "model_config") == 0 || strcmp(key, "preset") == 0) {
                continue; /* a path / a name that resets the model keys */
            }
            CHECK_OK(relora_params_get(p, key, value, sizeof value, &n));
            CHECK_OK(relora_params_set(p, key, value));
        }
        CHECK_STATUS(relora_params_key_name(count, key, sizeof key, &n),
                     RELORA_STATUS_INVALID_ARGUMENT, "out of range");
    }

    /* Config files: missing, not JSON, unknown key (all or nothing). */
    snprintf(path, sizeof path, "%s/no-such-file.json", workdir);
    CHECK_STATUS(relora_params_load_file(p, path), RELORA_STATUS_IO, "no-such-file.json");
    snprintf(path, sizeof path, "%s/bad.json", workdir);
    f = fopen(path, "w");
    CHECK(f != NULL);
    if (f != NULL) {
        fputs("{\"lr\": 0.5, \"steps\": ", f);
        fclose(f);
    }
    CHECK_STATUS(relora_params_load_file(p, path), RELORA_STATUS_INVALID_CONFIG, "bad.json");
    f = fopen(path, "w");
    if (f != NULL) {
        fputs("{\"lr\": 0.5, \"colour\": \"blue\"}", f);
        fclose(f);
    }
    CHECK_STATUS(relora_params_load_file(p, path), RELORA_STATUS_UNKNOWN_PARAM, "colour");
    CHECK_OK(relora_params_get_float(p, "lr", &fv));
    CHECK(fabs(fv - 2e-3) < 1e-12);
    f = fopen(path, "w");
    if (f != NULL) {
        fputs("{\"lr\": 0.004, \"target_modules\": [\"q_proj\", \"v_proj\"]}", f);
        fclose(f);
    }
    CHECK_OK(relora_params_load_file(p, path));
    CHECK_OK(relora_params_get_float(p, "lr", &fv));
    CHECK(fabs(fv - 4e-3) < 1e-12);

    /* Inconsistent options fail at validation and creation, with outputs untouched. */
    CHECK_OK(relora_params_clone(p, &clone));
    CHECK(clone != (relora_params *)SENTINEL);
    CHECK_OK(relora_params_set_int(clone, "warmup_steps", 100));
    CHECK_STATUS(relora_params_validate(clone), RELORA_STATUS_INVALID_CONFIG, "warmup_steps");
    CHECK_STATUS(relora_trainer_new(clone, &t), RELORA_STATUS_INVALID_CONFIG, "warmup_steps");
    CHECK(t == (relora_trainer *)SENTINEL);
    CHECK_OK(relora_params_set_int(clone, "warmup_steps", 1));
    CHECK_OK(relora_params_set(clone, "tokenizer", "bytes")); /* 258 ids > vocab_size 64 */
    CHECK_STATUS(relora_trainer_new(clone, &t), RELORA_STATUS_INVALID_CONFIG, "258");
    CHECK_OK(relora_params_set(clone, "tokenizer", "/no/such/tokenizer.json"));
    CHECK_STATUS(relora_trainer_new(clone, &t), RELORA_STATUS_TOKENIZER, "tokenizer.json");
    CHECK_OK(relora_params_set(clone, "tokenizer", ""));
    CHECK_OK(relora_params_set(clone, "device", "cuda:0"));
    CHECK_STATUS(relora_trainer_new(clone, &t), RELORA_STATUS_DEVICE, "cuda:0");
    CHECK(t == (relora_trainer *)SENTINEL);
    CHECK_STATUS(relora_trainer_new(NULL, &t), RELORA_STATUS_NULL_PARAMETER, "params");
    CHECK_STATUS(relora_trainer_new(clone, NULL), RELORA_STATUS_NULL_PARAMETER, "out");
    relora_params_free(clone);

    /* A freed params handle is detected, not dereferenced. */
    CHECK_STATUS(relora_params_set(clone, "lr", "0.1"), RELORA_STATUS_INVALID_HANDLE,
                 "not a live relora_params");
    relora_params_free(clone);
    CHECK(strstr(check_last_error(), "not a live relora_params") != NULL);
    relora_params_free(NULL);
    relora_params_free(p);
}

struct reentry {
    relora_trainer *trainer;
    relora_status inner;
};

/* A progress callback that calls back into its own trainer: must be refused with BUSY. */
static bool reenter(void *user_data, relora_progress_stage stage, uint64_t done, uint64_t total) {
    struct reentry *r = (struct reentry *)user_data;
    uint64_t steps = 0;
    (void)stage;
    (void)done;
    (void)total;
    r->inner = relora_trainer_step_count(r->trainer, &steps);
    return true;
}

static bool refuse(void *user_data, size_t index, const char *name, float *grad, size_t len) {
    (void)user_data;
    (void)name;
    (void)grad;
    (void)len;
    return index < 3; /* fail on the fourth parameter */
}

static void misuse_trainer(const char *workdir) {
    relora_params *p = tiny_params();
    relora_trainer *t = NULL, *loaded = (relora_trainer *)SENTINEL;
    int32_t rows[BATCH * LEN];
    int32_t long_rows[300];
    relora_step_stats stats;
    double loss = -1;
    float fl = -1, values[4] = {0, 0, 0, 0};
    uint64_t steps = 99;
    size_t n = 0, dims[1] = {0};
    char buf[256], path[4096];
    struct reentry re;
    int stack_object = 0;
    FILE *f;

    CHECK_OK(relora_trainer_new(p, &t));
    if (t == NULL) {
        relora_params_free(p);
        return;
    }
    fill_tokens(rows, BATCH * LEN);
    memset(&stats, 0, sizeof stats);
    stats.struct_size = sizeof stats;

    CHECK_STATUS(relora_trainer_last_stats(t, &stats), RELORA_STATUS_INVALID_STATE, "no step");
    CHECK_STATUS(relora_trainer_merge(t), RELORA_STATUS_INVALID_STATE, "no adapters");
    CHECK_STATUS(relora_trainer_apply(t, NULL, NULL, NULL), RELORA_STATUS_INVALID_STATE,
                 "relora_trainer_accumulate first");

    /* Bad token arguments. */
    CHECK_STATUS(relora_trainer_step(NULL, rows, BATCH, LEN, NULL), RELORA_STATUS_NULL_PARAMETER,
                 "trainer");
    CHECK_STATUS(relora_trainer_step(t, NULL, BATCH, LEN, NULL), RELORA_STATUS_NULL_PARAMETER,
                 "tokens");
    CHECK_STATUS(relora_trainer_step(t, rows, 0, LEN, NULL), RELORA_STATUS_INVALID_ARGUMENT,
                 "batch is 0");
    CHECK_STATUS(relora_trainer_step(t, rows, BATCH, 1, NULL), RELORA_STATUS_INVALID_ARGUMENT,
                 "at least 2 tokens");
    CHECK_STATUS(relora_trainer_step(t, rows, BATCH, 0, NULL), RELORA_STATUS_INVALID_ARGUMENT,
                 "len is 0");
    CHECK_STATUS(relora_trainer_step(t, rows, (size_t)-1, LEN, NULL),
                 RELORA_STATUS_INVALID_ARGUMENT, "overflows");
    rows[LEN + 4] = VOCAB;
    CHECK_STATUS(relora_trainer_step(t, rows, BATCH, LEN, NULL), RELORA_STATUS_INVALID_DATA,
                 "row 1, column 4");
    rows[LEN + 4] = -3;
    CHECK_STATUS(relora_trainer_step(t, rows, BATCH, LEN, NULL), RELORA_STATUS_INVALID_DATA,
                 "-3");
    fill_tokens(rows, BATCH * LEN);
    fill_tokens(long_rows, 300);
    CHECK_STATUS(relora_trainer_step(t, long_rows, 1, 300, NULL), RELORA_STATUS_INVALID_DATA,
                 "max_position_embeddings");
    stats.struct_size = 8;
    CHECK_STATUS(relora_trainer_step(t, rows, BATCH, LEN, &stats), RELORA_STATUS_INVALID_ARGUMENT,
                 "struct_size");
    stats.struct_size = sizeof stats;
    CHECK_STATUS(relora_trainer_eval(t, rows, BATCH, LEN, NULL), RELORA_STATUS_NULL_PARAMETER,
                 "loss");
    CHECK(loss == -1);

    /* After all those errors the trainer still trains. */
    CHECK_OK(relora_trainer_step_count(t, &steps));
    CHECK(steps == 0);
    CHECK_OK(relora_trainer_step(t, rows, BATCH, LEN, &stats));
    CHECK(stats.step == 1);
    CHECK_OK(relora_trainer_eval(t, rows, BATCH, LEN, &loss));
    CHECK(loss > 0 && isfinite(loss));

    /* The split form in the wrong order. */
    CHECK_OK(relora_trainer_accumulate(t, rows, BATCH, LEN, &fl));
    CHECK(fl > 0);
    CHECK_STATUS(relora_trainer_step(t, rows, BATCH, LEN, NULL), RELORA_STATUS_INVALID_STATE,
                 "split step");
    snprintf(path, sizeof path, "%s/ckpt", workdir);
    CHECK_STATUS(relora_trainer_save(t, path, NULL), RELORA_STATUS_INVALID_STATE, "split step");
    CHECK_STATUS(relora_trainer_tensor_set(t, "model.norm.weight", values, 4),
                 RELORA_STATUS_INVALID_STATE, "split step");
    CHECK_STATUS(relora_trainer_apply(t, refuse, NULL, NULL), RELORA_STATUS_CALLBACK_FAILED,
                 "index 3");
    CHECK_STATUS(relora_trainer_apply(t, NULL, NULL, NULL), RELORA_STATUS_INVALID_STATE,
                 "accumulate");
    CHECK_OK(relora_trainer_step_count(t, &steps));
    CHECK(steps == 1);

    /* Re-entrant call from a callback: refused inside, the outer call succeeds. */
    re.trainer = t;
    re.inner = RELORA_STATUS_OK;
    CHECK_OK(relora_trainer_set_progress_callback(t, reenter, &re));
    CHECK_OK(relora_trainer_step(t, rows, BATCH, LEN, NULL));
    CHECK(re.inner == RELORA_STATUS_BUSY);
    CHECK_OK(relora_trainer_set_progress_callback(t, NULL, NULL));
    CHECK_STATUS(relora_trainer_set_log_callback(t, NULL, NULL, 0), RELORA_STATUS_INVALID_ARGUMENT,
                 "max_level");

    /* Tensors: unknown names, wrong lengths, non-finite values, short shape buffers. */
    CHECK_STATUS(relora_trainer_tensor_numel(t, "model.embed.weight", &n),
                 RELORA_STATUS_UNKNOWN_TENSOR, "model.embed.weight");
    CHECK_STATUS(relora_trainer_tensor_get(t, "model.norm.weight", values, 4),
                 RELORA_STATUS_INVALID_ARGUMENT, "64 elements");
    CHECK_STATUS(relora_trainer_tensor_set(t, "model.norm.weight", values, 0),
                 RELORA_STATUS_INVALID_ARGUMENT, "length 0");
    {
        float norm[64];
        int i;
        for (i = 0; i < 64; i++) {
            norm[i] = 1.0f;
        }
        norm[5] = INFINITY;
        CHECK_STATUS(relora_trainer_tensor_set(t, "model.norm.weight", norm, 64),
                     RELORA_STATUS_INVALID_ARGUMENT, "index 5");
    }
    CHECK_STATUS(relora_trainer_tensor_shape(t, "lm_head.weight", dims, 1, &n),
                 RELORA_STATUS_BUFFER_TOO_SMALL, "2 dimensions");
    CHECK_OK(relora_trainer_tensor_shape(t, "lm_head.weight", NULL, 0, &n));
    CHECK(n == 2);
    CHECK_STATUS(relora_trainer_tensor_name(t, 100000, buf, sizeof buf, &n),
                 RELORA_STATUS_INVALID_ARGUMENT, "out of range");
    CHECK_STATUS(relora_trainer_config_get(t, "colour", buf, sizeof buf, &n),
                 RELORA_STATUS_UNKNOWN_PARAM, "colour");

    /* Exports: bad dtype, a directory relora did not write (with or without overwrite). */
    snprintf(path, sizeof path, "%s/export", workdir);
    CHECK_STATUS(relora_trainer_export(t, path, "int4", 0, false),
                 RELORA_STATUS_INVALID_ARGUMENT, "int4");
    CHECK_STATUS(relora_trainer_export(t, workdir, NULL, 0, false), RELORA_STATUS_OUTPUT_EXISTS,
                 "relora replaces only its own");
    CHECK_STATUS(relora_trainer_export(t, workdir, NULL, 0, true), RELORA_STATUS_OUTPUT_EXISTS,
                 "bad.json");

    /* Checkpoints: host state must be JSON; missing and corrupt checkpoints are refused. */
    snprintf(path, sizeof path, "%s/ckpt", workdir);
    CHECK_STATUS(relora_trainer_save(t, path, "{not json"), RELORA_STATUS_INVALID_ARGUMENT,
                 "JSON");
    CHECK_OK(relora_trainer_save(t, path, "[1, 2, 3]"));
    snprintf(path, sizeof path, "%s/missing-ckpt", workdir);
    CHECK_STATUS(relora_trainer_load(path, NULL, &loaded), RELORA_STATUS_CHECKPOINT,
                 "manifest.json");
    CHECK(loaded == (relora_trainer *)SENTINEL);
    snprintf(path, sizeof path, "%s/ckpt", workdir);
    CHECK_STATUS(relora_trainer_load(path, "gpu", &loaded), RELORA_STATUS_DEVICE, "gpu");
    snprintf(path, sizeof path, "%s/ckpt/params.safetensors", workdir);
    f = fopen(path, "r+b");
    CHECK(f != NULL);
    if (f != NULL) {
        fseek(f, 200, SEEK_SET);
        fputc(0x42, f);
        fputc(0x42, f);
        fclose(f);
    }
    snprintf(path, sizeof path, "%s/ckpt", workdir);
    CHECK_STATUS(relora_trainer_load(path, NULL, &loaded), RELORA_STATUS_CHECKPOINT,
                 "params.safetensors");
    CHECK(loaded == (relora_trainer *)SENTINEL);

    /* Handles of the wrong kind, wild pointers, double frees. */
    CHECK_STATUS(relora_trainer_step_count((relora_trainer *)p, &steps),
                 RELORA_STATUS_INVALID_HANDLE, "is a relora_params handle");
    CHECK_STATUS(relora_params_validate((relora_params *)t), RELORA_STATUS_INVALID_HANDLE,
                 "is a relora_trainer handle");
    CHECK_STATUS(relora_trainer_step_count((relora_trainer *)&stack_object, &steps),
                 RELORA_STATUS_INVALID_HANDLE, "not a live relora_trainer");
    relora_trainer_free(t);
    CHECK_STATUS(relora_trainer_step(t, rows, BATCH, LEN, NULL), RELORA_STATUS_INVALID_HANDLE,
                 "already freed");
    relora_trainer_free(t);
    CHECK(strstr(check_last_error(), "not a live relora_trainer") != NULL);
    relora_trainer_free(NULL);
    relora_params_free(p);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s WORKDIR\n", argv[0]);
        return 2;
    }
    misuse_errors_and_versions();
    misuse_params(argv[1]);
    misuse_trainer(argv[1]);
    return check_finish("c misuse");
}
