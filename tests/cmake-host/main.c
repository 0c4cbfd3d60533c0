/* Trains a tiny model for a few steps through the installed C API (static library); also the
 * program the test builds with pkg-config. Exits non-zero on any failure. */
#include <relora.h>

#include <stdint.h>
#include <stdio.h>
#include <string.h>

static int fail(const char *what, relora_status st) {
    char msg[512];
    size_t n = 0;
    relora_last_error_message(msg, sizeof msg, &n);
    fprintf(stderr, "%s failed (%d): %s\n", what, (int)st, msg);
    return 1;
}

int main(void) {
    relora_params *p = NULL;
    relora_trainer *t = NULL;
    relora_status st;
    int32_t tokens[2 * 17];
    relora_step_stats stats;
    double first = 0;
    size_t i;
    int step;

    if (relora_abi_version() != RELORA_ABI_VERSION) {
        fprintf(stderr, "header ABI %d, library ABI %u\n", RELORA_ABI_VERSION,
                (unsigned)relora_abi_version());
        return 1;
    }
    if ((st = relora_params_new(&p)) != RELORA_STATUS_OK) return fail("params_new", st);
    if ((st = relora_params_set(p, "preset", "tiny")) != RELORA_STATUS_OK ||
        (st = relora_params_set_int(p, "vocab_size", 64)) != RELORA_STATUS_OK ||
        (st = relora_params_set_int(p, "seq_len", 16)) != RELORA_STATUS_OK ||
        (st = relora_params_set(p, "mode", "full")) != RELORA_STATUS_OK ||
        (st = relora_params_set_int(p, "steps", 10)) != RELORA_STATUS_OK ||
        (st = relora_params_set_int(p, "warmup_steps", 1)) != RELORA_STATUS_OK) {
        return fail("params_set", st);
    }
    if ((st = relora_trainer_new(p, &t)) != RELORA_STATUS_OK) return fail("trainer_new", st);
    relora_params_free(p);
    for (i = 0; i < sizeof tokens / sizeof tokens[0]; i++) {
        tokens[i] = (int32_t)((i * 3) % 64);
    }
    for (step = 0; step < 5; step++) {
        memset(&stats, 0, sizeof stats);
        stats.struct_size = sizeof stats;
        if ((st = relora_trainer_step(t, tokens, 2, 17, &stats)) != RELORA_STATUS_OK) {
            return fail("trainer_step", st);
        }
        if (step == 0) first = stats.loss;
    }
    printf("relora %s from C: loss %.4f -> %.4f\n", relora_version(), first, stats.loss);
    relora_trainer_free(t);
    return stats.loss < first ? 0 : 1;
}
