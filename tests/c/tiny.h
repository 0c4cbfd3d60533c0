/* Params for the tiny preset with a short ReLoRA schedule, shared by the C test hosts: warm-up
 * 1 step, re-warm-up 1 step after each merge; the rest as given. */
#ifndef RELORA_TEST_TINY_H
#define RELORA_TEST_TINY_H

#include <stdint.h>

#include "check.h"
#include "relora.h"

static inline relora_params *tiny_relora_params(int64_t vocab, int64_t seq, int64_t batch,
                                                int64_t steps, int64_t warmup_full,
                                                int64_t reset_every, int64_t rank) {
    relora_params *p = NULL;
    CHECK_OK(relora_params_new(&p));
    CHECK_OK(relora_params_set(p, "preset", "tiny"));
    CHECK_OK(relora_params_set_int(p, "vocab_size", vocab));
    CHECK_OK(relora_params_set_int(p, "seq_len", seq));
    CHECK_OK(relora_params_set_int(p, "batch_size", batch));
    CHECK_OK(relora_params_set_int(p, "steps", steps));
    CHECK_OK(relora_params_set_int(p, "warmup_steps", 1));
    CHECK_OK(relora_params_set_int(p, "warmup_full_steps", warmup_full));
    CHECK_OK(relora_params_set_int(p, "reset_every", reset_every));
    CHECK_OK(relora_params_set_int(p, "restart_warmup_steps", 1));
    CHECK_OK(relora_params_set_int(p, "lora_rank", rank));
    return p;
}

#endif
