/* Data parallelism through the split step: two trainers on two threads each accumulate half of
 * every batch and average their gradients in the reduce callback (an all-reduce over shared
 * memory, as a host's communicator would do across processes). After several steps, through the
 * switch to adapters and a ReLoRA merge, both must hold the same weights as one trainer that
 * took the whole batch, within 1e-6.
 *
 * usage: allreduce CORPUS */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "tiny.h"
#include "relora.h"

enum { SEQ = 16, LEN = SEQ + 1, HALF = 2, BATCH = 2 * HALF, STEPS = 7, VOCAB = 258 };

/* What the two ranks share: a barrier and each rank's current gradient buffer. */
struct comm {
    pthread_barrier_t barrier;
    float *grad[2];
    size_t len[2];
    size_t index[2];
    float *mean;
    size_t mean_cap;
    int mismatch;
    size_t calls[2];
};

struct rank {
    int id;
    struct comm *comm;
    relora_trainer *trainer;
    const int32_t *batches; /* STEPS batches of BATCH rows */
    int failed;
};

/* Averages this rank's gradient with the other rank's, in place. */
static bool all_reduce_mean(void *user_data, size_t index, const char *name, float *grad,
                            size_t len) {
    struct rank *r = (struct rank *)user_data;
    struct comm *c = r->comm;
    size_t i;
    (void)name;
    c->grad[r->id] = grad;
    c->len[r->id] = len;
    c->index[r->id] = index;
    c->calls[r->id]++;
    pthread_barrier_wait(&c->barrier);
    if (r->id == 0) {
        if (c->len[0] != c->len[1] || c->index[0] != c->index[1]) {
            c->mismatch = 1;
        } else {
            if (c->mean_cap < len) {
                free(c->mean);
                c->mean = (float *)malloc(len * sizeof(float));
                c->mean_cap = len;
            }
            for (i = 0; i < len; i++) {
                c->mean[i] = 0.5f * (c->grad[0][i] + c->grad[1][i]);
            }
        }
    }
    pthread_barrier_wait(&c->barrier);
    if (c->mismatch) {
        return false;
    }
    memcpy(grad, c->mean, len * sizeof(float));
    /* Nobody may overwrite `mean` before both ranks have copied it. */
    pthread_barrier_wait(&c->barrier);
    return true;
}

static void *run_rank(void *arg) {
    struct rank *r = (struct rank *)arg;
    int step;
    for (step = 0; step < STEPS; step++) {
        const int32_t *mine = r->batches + ((size_t)step * BATCH + (size_t)r->id * HALF) * LEN;
        relora_step_stats stats;
        memset(&stats, 0, sizeof stats);
        stats.struct_size = sizeof stats;
        if (relora_trainer_accumulate(r->trainer, mine, HALF, LEN, NULL) != RELORA_STATUS_OK ||
            relora_trainer_apply(r->trainer, all_reduce_mean, r, &stats) != RELORA_STATUS_OK) {
            fprintf(stderr, "rank %d step %d: %s\n", r->id, step, check_last_error());
            r->failed = 1;
            return NULL;
        }
    }
    return NULL;
}

static relora_trainer *make_trainer(void) {
    relora_params *p = tiny_relora_params(VOCAB, SEQ, BATCH, 20, 2, 3, 4);
    relora_trainer *t = NULL;
    CHECK_OK(relora_params_set_float(p, "lr", 1e-3));
    /* Adam divides by sqrt(v) + eps: with the default eps a gradient that is pure float rounding
     * noise (a near-cancelling sum, computed in a different order by the two set-ups) becomes a
     * step of about lr either way. A larger eps keeps such noise at its own size, so the check
     * measures the reduction rather than Adam's conditioning. */
    CHECK_OK(relora_params_set_float(p, "eps", 1e-4));
    /* No clipping: it would rescale a wrongly scaled (summed instead of averaged) gradient back
     * to the same norm and hide the mistake. */
    CHECK_OK(relora_params_set_float(p, "grad_clip", 0.0));
    CHECK_OK(relora_params_set_int(p, "seed", 11));
    CHECK_OK(relora_trainer_new(p, &t));
    relora_params_free(p);
    return t;
}

/* Largest absolute difference between the two trainers' parameters; -1 on a failure. */
static double max_difference(relora_trainer *a, relora_trainer *b) {
    size_t count = 0, count_b = 0, k, i, n = 0, na = 0, nb = 0;
    double worst = 0;
    char name[256];
    if (relora_trainer_tensor_count(a, &count) != RELORA_STATUS_OK ||
        relora_trainer_tensor_count(b, &count_b) != RELORA_STATUS_OK || count != count_b) {
        return -1;
    }
    for (k = 0; k < count; k++) {
        float *va, *vb;
        if (relora_trainer_tensor_name(a, k, name, sizeof name, &n) != RELORA_STATUS_OK ||
            relora_trainer_tensor_numel(a, name, &na) != RELORA_STATUS_OK ||
            relora_trainer_tensor_numel(b, name, &nb) != RELORA_STATUS_OK || na != nb) {
            return -1;
        }
        va = (float *)malloc(na * sizeof(float));
        vb = (float *)malloc(nb * sizeof(float));
        if (relora_trainer_tensor_get(a, name, va, na) != RELORA_STATUS_OK ||
            relora_trainer_tensor_get(b, name, vb, nb) != RELORA_STATUS_OK) {
            free(va);
            free(vb);
            return -1;
        }
        for (i = 0; i < na; i++) {
            double d = fabs((double)va[i] - (double)vb[i]);
            if (!(d <= worst)) {
                worst = d; /* also catches NaN */
            }
        }
        free(va);
        free(vb);
    }
    return worst;
}

int main(int argc, char **argv) {
    unsigned char *text;
    size_t text_len = 0, i;
    int32_t *batches;
    relora_trainer *whole, *ranks[2];
    struct comm comm;
    struct rank r[2];
    pthread_t threads[2];
    int step, k;
    double d_whole, d_ranks;
    uint64_t phase = 0;
    size_t trainable = 0;

    if (argc != 2) {
        fprintf(stderr, "usage: %s CORPUS\n", argv[0]);
        return 2;
    }
    text = check_read_file(argv[1], &text_len);
    if (text_len < (size_t)STEPS * BATCH * LEN) {
        fprintf(stderr, "corpus too small\n");
        return 2;
    }
    batches = (int32_t *)malloc((size_t)STEPS * BATCH * LEN * sizeof(int32_t));
    for (i = 0; i < (size_t)STEPS * BATCH * LEN; i++) {
        batches[i] = text[i * 3 % text_len];
    }
    free(text);

    whole = make_trainer();
    ranks[0] = make_trainer();
    ranks[1] = make_trainer();
    if (whole == NULL || ranks[0] == NULL || ranks[1] == NULL) {
        return check_finish("c allreduce");
    }

    /* The reference: one trainer, whole batches, split form without a reducer. */
    for (step = 0; step < STEPS; step++) {
        CHECK_OK(relora_trainer_accumulate(whole, batches + (size_t)step * BATCH * LEN, BATCH,
                                           LEN, NULL));
        CHECK_OK(relora_trainer_apply(whole, NULL, NULL, NULL));
    }

    memset(&comm, 0, sizeof comm);
    pthread_barrier_init(&comm.barrier, NULL, 2);
    for (k = 0; k < 2; k++) {
        r[k].id = k;
        r[k].comm = &comm;
        r[k].trainer = ranks[k];
        r[k].batches = batches;
        r[k].failed = 0;
        pthread_create(&threads[k], NULL, run_rank, &r[k]);
    }
    for (k = 0; k < 2; k++) {
        pthread_join(threads[k], NULL);
        CHECK(!r[k].failed);
    }
    CHECK(!comm.mismatch);
    CHECK(comm.calls[0] == comm.calls[1] && comm.calls[0] > 0);

    CHECK_OK(relora_trainer_phase(whole, &phase));
    CHECK(phase >= 1); /* the comparison crosses a ReLoRA merge */
    CHECK_OK(relora_trainer_tensor_count(whole, &trainable));
    d_ranks = max_difference(ranks[0], ranks[1]);
    d_whole = max_difference(ranks[0], whole);
    printf("max |rank0 - rank1| = %.3g, max |rank0 - whole batch| = %.3g over %zu tensors\n",
           d_ranks, d_whole, trainable);
    CHECK(d_ranks == 0.0);
    CHECK(d_whole >= 0.0 && d_whole <= 1e-6);

    pthread_barrier_destroy(&comm.barrier);
    free(comm.mean);
    free(batches);
    relora_trainer_free(whole);
    relora_trainer_free(ranks[0]);
    relora_trainer_free(ranks[1]);
    return check_finish("c allreduce");
}
