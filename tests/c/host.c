/* A C training host: create a trainer from params, train 20 steps on real text (byte tokens),
 * check that the loss falls, save, free, reload from the checkpoint, train on with the split
 * (accumulate + apply) form, merge, export, free.
 *
 * usage: host CORPUS WORKDIR [quick]
 *   CORPUS: a text file; WORKDIR: an empty writable directory; quick: 10 + 2 steps instead of
 *   20 + 10 (for runs under valgrind). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "relora.h"

enum { SEQ = 32, LEN = SEQ + 1, BATCH = 4, VOCAB = 258 };

/* The schedule set in make_params(): adapters from step 8 on, a merge every 6 steps after. */
enum { WARMUP_FULL = 8, RESET_EVERY = 6 };

/* ReLoRA merges done after `steps` optimizer steps: one before each step t > WARMUP_FULL with
 * (t - WARMUP_FULL) a multiple of RESET_EVERY (t counts from 0). */
static uint64_t expected_phase(int steps) {
    uint64_t n = 0;
    int t;
    for (t = WARMUP_FULL + 1; t < steps; t++) {
        if ((t - WARMUP_FULL) % RESET_EVERY == 0) {
            n++;
        }
    }
    return n;
}

/* The corpus as byte tokens, and where the next training window starts. */
static int32_t *corpus;
static size_t corpus_len;
static size_t cursor;

/* Fills `rows` with BATCH consecutive windows of LEN tokens from the training part (the first
 * 90%) of the corpus; the last 10% is held out for evaluation. */
static void next_batch(int32_t *rows) {
    size_t train_len = corpus_len * 9 / 10;
    int r;
    for (r = 0; r < BATCH; r++) {
        if (cursor + LEN > train_len) {
            cursor = 0;
        }
        memcpy(rows + (size_t)r * LEN, corpus + cursor, LEN * sizeof(int32_t));
        cursor += SEQ;
    }
}

struct log_counts {
    int total;
    int info;
    int errors;
};

static void on_log(void *user_data, relora_log_level level, const char *message) {
    struct log_counts *c = (struct log_counts *)user_data;
    c->total++;
    if (level == RELORA_LOG_LEVEL_INFO) {
        c->info++;
        printf("  [relora] %s\n", message);
    }
    if (level == RELORA_LOG_LEVEL_ERROR) {
        c->errors++;
    }
}

static bool on_progress(void *user_data, relora_progress_stage stage, uint64_t done,
                        uint64_t total) {
    int *calls = (int *)user_data;
    (void)stage;
    if (done == 0 || done > total) {
        return false;
    }
    (*calls)++;
    return true;
}

/* A reducer that leaves the gradient as it is and counts the parameters it saw, checking that
 * indices arrive in order. */
struct reduce_seen {
    size_t calls;
    int out_of_order;
};

static bool identity_reduce(void *user_data, size_t index, const char *name, float *grad,
                            size_t len) {
    struct reduce_seen *seen = (struct reduce_seen *)user_data;
    if (index != seen->calls || name == NULL || grad == NULL || len == 0) {
        seen->out_of_order = 1;
    }
    seen->calls++;
    return true;
}

static int file_exists(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        return 0;
    }
    fclose(f);
    return 1;
}

static relora_step_stats new_stats(void) {
    relora_step_stats s;
    memset(&s, 0, sizeof s);
    s.struct_size = (uint32_t)sizeof s;
    return s;
}

static void check_versions(void) {
    char expect[64];
    snprintf(expect, sizeof expect, "%d.%d.%d", RELORA_VERSION_MAJOR, RELORA_VERSION_MINOR,
             RELORA_VERSION_PATCH);
    CHECK(strcmp(relora_version(), expect) == 0);
    CHECK(relora_version_number() == RELORA_VERSION_NUMBER);
    CHECK(RELORA_VERSION_NUMBER == (((uint32_t)RELORA_VERSION_MAJOR << 16) |
                                    ((uint32_t)RELORA_VERSION_MINOR << 8) |
                                    (uint32_t)RELORA_VERSION_PATCH));
    CHECK(relora_abi_version() == RELORA_ABI_VERSION);
}

static relora_params *make_params(void) {
    relora_params *p = NULL;
    char buf[64];
    size_t n = 0;
    int64_t steps = 0;
    CHECK_OK(relora_params_new(&p));
    CHECK_OK(relora_params_set(p, "preset", "tiny"));
    CHECK_OK(relora_params_set(p, "tokenizer", "bytes"));
    CHECK_OK(relora_params_set_int(p, "vocab_size", VOCAB));
    CHECK_OK(relora_params_set_int(p, "seq_len", SEQ));
    CHECK_OK(relora_params_set_int(p, "batch_size", BATCH));
    CHECK_OK(relora_params_set_int(p, "steps", 60));
    CHECK_OK(relora_params_set_int(p, "warmup_steps", 2));
    CHECK_OK(relora_params_set(p, "mode", "relora"));
    CHECK_OK(relora_params_set_int(p, "warmup_full_steps", WARMUP_FULL));
    CHECK_OK(relora_params_set_int(p, "reset_every", RESET_EVERY));
    CHECK_OK(relora_params_set_int(p, "restart_warmup_steps", 2));
    CHECK_OK(relora_params_set_int(p, "lora_rank", 8));
    CHECK_OK(relora_params_set_float(p, "lr", 1e-2));
    CHECK_OK(relora_params_set(p, "reset_mode", "magnitude:0.9"));
    CHECK_OK(relora_params_set_int(p, "seed", 7));
    CHECK_OK(relora_params_get(p, "mode", buf, sizeof buf, &n));
    CHECK(strcmp(buf, "relora") == 0 && n == 6);
    CHECK_OK(relora_params_get_int(p, "steps", &steps));
    CHECK(steps == 60);
    CHECK_OK(relora_params_validate(p));
    return p;
}

int main(int argc, char **argv) {
    unsigned char *text;
    size_t i;
    int step;
    int32_t rows[BATCH * LEN];
    double first_losses = 0, last_losses = 0, eval_loss = 0, eval_after = 0;
    relora_params *params;
    relora_trainer *t = NULL;
    struct log_counts logs = {0, 0, 0};
    int progress_calls = 0;
    relora_step_stats stats;
    char path[4096], buf[4096], file[4200];
    size_t n = 0, count = 0, ndims = 0, dims[4] = {0, 0, 0, 0}, numel = 0;
    float *embed = NULL, *embed_reloaded = NULL;
    uint64_t u = 0;
    int64_t v = 0;
    const size_t eval_rows = 8;
    int32_t *held_out;
    struct reduce_seen seen = {0, 0};
    int first_steps = 20, more_steps = 10;

    if (argc == 4 && strcmp(argv[3], "quick") == 0) {
        first_steps = 10;
        more_steps = 2;
    } else if (argc != 3) {
        fprintf(stderr, "usage: %s CORPUS WORKDIR [quick]\n", argv[0]);
        return 2;
    }
    text = check_read_file(argv[1], &corpus_len);
    corpus = (int32_t *)malloc(corpus_len * sizeof(int32_t));
    for (i = 0; i < corpus_len; i++) {
        corpus[i] = text[i];
    }
    free(text);
    if (corpus_len < 20000) {
        fprintf(stderr, "corpus too small\n");
        return 2;
    }
    held_out = corpus + corpus_len * 9 / 10;

    check_versions();
    params = make_params();
    CHECK_OK(relora_trainer_new(params, &t));
    relora_params_free(params); /* the trainer keeps its own copy */
    if (t == NULL) {
        return check_finish("c host");
    }
    CHECK_OK(relora_trainer_set_log_callback(t, on_log, &logs, RELORA_LOG_LEVEL_DEBUG));
    CHECK_OK(relora_trainer_set_progress_callback(t, on_progress, &progress_calls));
    stats = new_stats();
    CHECK_STATUS(relora_trainer_last_stats(t, &stats), RELORA_STATUS_INVALID_STATE,
                 "no step");

    CHECK_OK(relora_trainer_eval(t, held_out, eval_rows, LEN, &eval_loss));
    CHECK(eval_loss > 4.5 && eval_loss < 7.0); /* about ln(258) before training */

    /* 20 steps with the one-call form. */
    for (step = 0; step < first_steps; step++) {
        stats = new_stats();
        next_batch(rows);
        CHECK_OK(relora_trainer_step(t, rows, BATCH, LEN, &stats));
        CHECK(stats.step == (uint64_t)step + 1);
        CHECK(stats.struct_size == sizeof stats);
        CHECK(isfinite(stats.loss) && stats.lr > 0 && stats.grad_norm > 0);
        CHECK(stats.tokens == BATCH * SEQ);
        CHECK(!stats.skipped);
        if (step == WARMUP_FULL) {
            CHECK(stats.switched && stats.adapters);
        }
        CHECK(stats.phase == expected_phase(step + 1));
        CHECK(stats.merged == (expected_phase(step + 1) != expected_phase(step)));
        if (step < 5) {
            first_losses += stats.loss / 5;
        }
        if (step >= first_steps - 5) {
            last_losses += stats.loss / 5;
        }
        printf("step %2d loss %.4f lr %.2e grad_norm %.3f phase %u\n", (int)stats.step,
               stats.loss, stats.lr, stats.grad_norm, stats.phase);
    }
    printf("mean loss: first 5 steps %.4f, last 5 steps %.4f\n", first_losses, last_losses);
    CHECK(last_losses < first_losses - 0.5);
    CHECK(progress_calls >= first_steps);
    CHECK(logs.info >= 1); /* the switch to adapters (and the merges) */
    CHECK(logs.total > first_steps);
    CHECK(logs.errors == 1); /* the deliberate relora_trainer_last_stats failure */
    CHECK_OK(relora_trainer_eval(t, held_out, eval_rows, LEN, &eval_after));
    printf("held-out loss %.4f -> %.4f\n", eval_loss, eval_after);
    CHECK(eval_after < eval_loss);

    CHECK_OK(relora_trainer_step_count(t, &u));
    CHECK(u == (uint64_t)first_steps);
    CHECK_OK(relora_trainer_phase(t, &u));
    CHECK(u == expected_phase(first_steps));
    CHECK_OK(relora_trainer_skipped_steps(t, &u));
    CHECK(u == 0);

    /* Parameters: list, shape, copy out, copy the same values back in. */
    CHECK_OK(relora_trainer_tensor_count(t, &count));
    CHECK(count > 10);
    CHECK_OK(relora_trainer_tensor_name(t, 0, buf, sizeof buf, &n));
    CHECK(strcmp(buf, "model.embed_tokens.weight") == 0);
    CHECK_OK(relora_trainer_tensor_shape(t, buf, dims, 4, &ndims));
    CHECK(ndims == 2 && dims[0] == VOCAB && dims[1] == 64);
    CHECK_OK(relora_trainer_tensor_numel(t, buf, &numel));
    CHECK(numel == VOCAB * 64);
    embed = (float *)malloc(numel * sizeof(float));
    embed_reloaded = (float *)malloc(numel * sizeof(float));
    CHECK_OK(relora_trainer_tensor_get(t, "model.embed_tokens.weight", embed, numel));
    CHECK_OK(relora_trainer_tensor_set(t, "model.embed_tokens.weight", embed, numel));
    CHECK_STATUS(relora_trainer_tensor_set(t, "model.layers.0.self_attn.q_proj.weight", embed,
                                           64 * 64),
                 RELORA_STATUS_INVALID_STATE, "frozen");

    /* Save with the host's own data cursor, free, reload. */
    snprintf(path, sizeof path, "%s/ckpt", argv[2]);
    snprintf(buf, sizeof buf, "{\"cursor\": %lu}", (unsigned long)cursor);
    CHECK_OK(relora_trainer_save(t, path, buf));
    relora_trainer_free(t);
    t = NULL;

    CHECK_OK(relora_trainer_load(path, NULL, &t));
    if (t == NULL) {
        return check_finish("c host");
    }
    CHECK_OK(relora_trainer_step_count(t, &u));
    CHECK(u == (uint64_t)first_steps);
    CHECK_OK(relora_trainer_phase(t, &u));
    CHECK(u == expected_phase(first_steps));
    CHECK_OK(relora_trainer_host_state(t, NULL, 0, &n));
    CHECK(n > 0 && n < sizeof buf);
    CHECK_OK(relora_trainer_host_state(t, buf, sizeof buf, &n));
    CHECK(strstr(buf, "\"cursor\"") != NULL);
    CHECK_OK(relora_trainer_config_get_int(t, "vocab_size", &v));
    CHECK(v == VOCAB);
    CHECK_OK(relora_trainer_config_get_int(t, "seq_len", &v));
    CHECK(v == SEQ);
    CHECK_OK(relora_trainer_config_get(t, "tokenizer", buf, sizeof buf, &n));
    CHECK(strcmp(buf, "bytes") == 0);
    CHECK_OK(relora_trainer_tensor_get(t, "model.embed_tokens.weight", embed_reloaded, numel));
    CHECK(memcmp(embed, embed_reloaded, numel * sizeof(float)) == 0);
    CHECK_OK(relora_trainer_eval(t, held_out, eval_rows, LEN, &eval_loss));
    CHECK(fabs(eval_loss - eval_after) < 1e-6);

    /* Train on with the split form: one micro-batch, then apply with a reducer. */
    CHECK_OK(relora_trainer_set_log_callback(t, on_log, &logs, RELORA_LOG_LEVEL_INFO));
    for (step = 0; step < more_steps; step++) {
        float loss = 0;
        stats = new_stats();
        next_batch(rows);
        seen.calls = 0;
        CHECK_OK(relora_trainer_accumulate(t, rows, BATCH, LEN, &loss));
        CHECK(isfinite(loss));
        CHECK_OK(relora_trainer_apply(t, identity_reduce, &seen, &stats));
        CHECK(seen.calls > 0 && !seen.out_of_order);
        CHECK(stats.step == (uint64_t)(first_steps + step + 1));
        CHECK(fabs(stats.loss - loss) < 1e-5);
    }
    CHECK_OK(relora_trainer_last_stats(t, &stats));
    CHECK(stats.step == (uint64_t)(first_steps + more_steps));
    CHECK(stats.loss < first_losses);

    /* Merge now, then export the merged model. */
    CHECK_OK(relora_trainer_phase(t, &u));
    CHECK(u == expected_phase(first_steps + more_steps));
    CHECK_OK(relora_trainer_merge(t));
    CHECK_OK(relora_trainer_phase(t, &u));
    CHECK(u == expected_phase(first_steps + more_steps) + 1);
    snprintf(path, sizeof path, "%s/hf", argv[2]);
    CHECK_OK(relora_trainer_export(t, path, "f32", 0, false));
    snprintf(file, sizeof file, "%s/config.json", path);
    CHECK(file_exists(file));
    snprintf(file, sizeof file, "%s/model.safetensors", path);
    CHECK(file_exists(file));
    snprintf(file, sizeof file, "%s/tokenizer.json", path);
    CHECK(file_exists(file));
    relora_trainer_free(t);
    relora_trainer_free(NULL);
    relora_params_free(NULL);

    free(embed);
    free(embed_reloaded);
    free(corpus);
    return check_finish("c host");
}
