// A C++ training host that brings its own communicator: MPI_COMM_WORLD, handed to relora through
// the reduce callback of the split step (relora.hpp's Trainer::apply). Each rank trains on its
// share of every batch, and the callback averages each trainable gradient over the ranks with
// MPI_Allreduce. After 20 steps, through the switch to adapters and three merges with their
// optimizer resets, every rank must hold the weights of an in-process trainer that took each
// whole batch (within 1e-5), and all ranks must hold the same bits.
//
// usage: mpirun -np N mpi_host   (rank 0 prints "all checks passed")
#include "relora.hpp"

// The C API of MPI only: the deprecated C++ bindings do not compile cleanly with -Werror.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace {

constexpr int SEQ = 16;
constexpr int LEN = SEQ + 1;
constexpr int PER_RANK = 2;
constexpr int STEPS = 20;
constexpr int VOCAB = 258;

// The same configuration on every rank and for the reference trainer.
relora::Params params(int global_batch) {
    relora::Params p;
    p.set("preset", "tiny")
        .set("vocab_size", std::to_string(VOCAB))
        .set("seq_len", std::to_string(SEQ))
        .set("batch_size", std::to_string(global_batch))
        .set("steps", "40")
        .set("warmup_steps", "1")
        .set("warmup_full_steps", "4")
        .set("reset_every", "5")
        .set("restart_warmup_steps", "1")
        .set("lora_rank", "4")
        .set("lr", "1e-3")
        // As in tests/c/allreduce.c: a larger eps keeps gradients that are pure rounding noise
        // (summed in another order by the two set-ups) from becoming steps of size lr.
        .set("eps", "1e-4")
        // No clipping: it would hide a summed instead of averaged gradient.
        .set("grad_clip", "0")
        .set("seed", "11");
    return p;
}

// STEPS batches of `rows` rows of LEN byte tokens, the same on every rank.
std::vector<std::int32_t> batches(int rows) {
    std::vector<std::int32_t> t(static_cast<std::size_t>(STEPS) * rows * LEN);
    std::uint64_t x = 0x9e3779b97f4a7c15ULL;
    for (auto &v : t) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        v = static_cast<std::int32_t>((x >> 33) % VOCAB);
    }
    return t;
}

int run(MPI_Comm comm) {
    int rank = 0, size = 1;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    const int global = PER_RANK * size;
    const std::vector<std::int32_t> tokens = batches(global);

    relora::Trainer parallel(params(global));
    relora::Trainer whole(params(global));
    // The host's all-reduce: sum over the ranks, then the mean, in place.
    const relora::Trainer::ReduceFn reduce = [&](std::size_t, std::string_view,
                                                 relora::Span<float> grad) {
        if (MPI_Allreduce(MPI_IN_PLACE, grad.data(), static_cast<int>(grad.size()), MPI_FLOAT,
                          MPI_SUM, comm) != MPI_SUCCESS) {
            throw std::runtime_error("MPI_Allreduce failed");
        }
        for (float &g : grad) {
            g /= static_cast<float>(size);
        }
    };
    int merges = 0, switched = 0;
    for (int step = 0; step < STEPS; ++step) {
        const std::int32_t *all = tokens.data() + static_cast<std::size_t>(step) * global * LEN;
        const std::int32_t *mine = all + static_cast<std::size_t>(rank) * PER_RANK * LEN;
        parallel.accumulate(relora::Span<const std::int32_t>(mine, PER_RANK * LEN), PER_RANK,
                            LEN);
        const auto s = parallel.apply(reduce);
        merges += s.merged ? 1 : 0;
        switched += s.switched ? 1 : 0;
        const auto w = whole.step(relora::Span<const std::int32_t>(all, global * LEN),
                                  global, LEN);
        if (s.merged != w.merged || s.switched != w.switched) {
            std::fprintf(stderr, "rank %d step %d: schedule differs from one process\n", rank,
                         step);
            return 1;
        }
    }

    // Every tensor against the one-process trainer, and against rank 0's bits.
    double worst = 0;
    int differs_from_rank0 = 0;
    for (const std::string &name : parallel.tensor_names()) {
        std::vector<float> a = parallel.tensor(name);
        const std::vector<float> b = whole.tensor(name);
        if (a.size() != b.size()) {
            std::fprintf(stderr, "rank %d: %s has %zu values, one process %zu\n", rank,
                         name.c_str(), a.size(), b.size());
            return 1;
        }
        for (std::size_t i = 0; i < a.size(); ++i) {
            worst = std::max(worst, std::fabs(static_cast<double>(a[i]) - b[i]));
        }
        std::vector<float> first = a;
        MPI_Bcast(first.data(), static_cast<int>(first.size()), MPI_FLOAT, 0, comm);
        if (!std::equal(first.begin(), first.end(), a.begin(), [](float x, float y) {
                return std::memcmp(&x, &y, sizeof x) == 0;
            })) {
            differs_from_rank0 = 1;
        }
    }
    double worst_all = 0;
    int differs_all = 0;
    MPI_Reduce(&worst, &worst_all, 1, MPI_DOUBLE, MPI_MAX, 0, comm);
    MPI_Reduce(&differs_from_rank0, &differs_all, 1, MPI_INT, MPI_MAX, 0, comm);
    if (rank != 0) {
        return 0;
    }
    std::printf("%d ranks, %d steps, switched %d, merges %d: largest difference from one "
                "process %.3g, ranks bit-identical: %s\n",
                size, STEPS, switched, merges, worst_all, differs_all ? "no" : "yes");
    if (switched != 1 || merges < 2 || !(worst_all <= 1e-5) || differs_all) {
        std::fprintf(stderr, "mpi host: checks failed\n");
        return 1;
    }
    std::printf("all checks passed\n");
    return 0;
}

}  // namespace

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int code = 1;
    try {
        code = run(MPI_COMM_WORLD);
    } catch (const std::exception &e) {
        std::fprintf(stderr, "mpi host: %s\n", e.what());
        // Another rank may be waiting in a collective: end them all rather than hang.
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    MPI_Finalize();
    return code;
}
