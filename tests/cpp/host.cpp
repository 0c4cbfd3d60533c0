// A C++ training host through relora.hpp: train 20 steps on real text (loss falls), save,
// destroy, resume from the checkpoint, train on with the split form and a reducer lambda,
// merge, export; plus the wrapper's error paths (exceptions with status and message, exceptions
// thrown by callbacks).
//
// usage: host_cpp CORPUS WORKDIR
#include "relora.hpp"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

std::vector<std::int32_t> byte_tokens(const std::string &text);
relora::Params tiny_params(int seq_len, int batch_size);

namespace {

int failures = 0;

void expect(bool ok, const char *what, int line) {
    if (!ok) {
        std::cerr << "host.cpp:" << line << ": check failed: " << what << "\n";
        ++failures;
    }
}

#define EXPECT(cond) expect((cond), #cond, __LINE__)

// Runs `body`, which must throw relora::Error with `status` and a message containing `fragment`.
template <typename F>
void expect_error(F &&body, relora_status status, const std::string &fragment, int line) {
    try {
        body();
        expect(false, "no exception", line);
    } catch (const relora::Error &e) {
        expect(e.status() == status, "status", line);
        expect(std::string(e.what()).find(fragment) != std::string::npos, e.what(), line);
    }
}

constexpr int kSeq = 32;
constexpr int kLen = kSeq + 1;
constexpr int kBatch = 4;

struct Corpus {
    std::vector<std::int32_t> ids;
    std::size_t cursor = 0;

    std::vector<std::int32_t> next() {
        std::vector<std::int32_t> rows;
        rows.reserve(kBatch * kLen);
        std::size_t train = ids.size() * 9 / 10;
        for (int r = 0; r < kBatch; ++r) {
            if (cursor + kLen > train) {
                cursor = 0;
            }
            rows.insert(rows.end(), ids.begin() + static_cast<std::ptrdiff_t>(cursor),
                        ids.begin() + static_cast<std::ptrdiff_t>(cursor + kLen));
            cursor += kSeq;
        }
        return rows;
    }

    std::vector<std::int32_t> held_out(int rows) const {
        auto start = ids.begin() + static_cast<std::ptrdiff_t>(ids.size() * 9 / 10);
        return std::vector<std::int32_t>(start, start + rows * kLen);
    }
};

bool exists(const std::string &path) { return std::ifstream(path).good(); }

}  // namespace

int main(int argc, char **argv) {
    if (argc != 3) {
        std::cerr << "usage: " << argv[0] << " CORPUS WORKDIR\n";
        return 2;
    }
    std::ifstream in(argv[1], std::ios::binary);
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    Corpus corpus{byte_tokens(text)};
    if (corpus.ids.size() < 20000) {
        std::cerr << "corpus too small\n";
        return 2;
    }
    const std::string work = argv[2];
    const std::vector<std::int32_t> held_out = corpus.held_out(8);

    EXPECT(relora::version() == relora_version());

    // Errors become exceptions carrying the status and the message.
    relora::Params params = tiny_params(kSeq, kBatch);
    expect_error([&] { params.set("colour", "blue"); }, RELORA_STATUS_UNKNOWN_PARAM, "colour",
                 __LINE__);
    expect_error([&] { params.set_int("mode", 2); }, RELORA_STATUS_INVALID_PARAM, "mode",
                 __LINE__);
    relora::Params copy = params;
    copy.set_int("warmup_steps", 500);
    EXPECT(params.get_int("warmup_steps") == 2);
    expect_error([&] { relora::Trainer bad(copy); }, RELORA_STATUS_INVALID_CONFIG, "warmup_steps",
                 __LINE__);

    double first = 0, last = 0, eval_before = 0, eval_after = 0;
    int info_lines = 0;
    {
        relora::Trainer trainer(params);
        trainer.on_log(
            [&](relora::LogLevel level, std::string_view message) {
                if (level == relora::LogLevel::Info) {
                    ++info_lines;
                    std::cout << "  [relora] " << message << "\n";
                }
            },
            relora::LogLevel::Debug);
        eval_before = trainer.eval(held_out, 8, kLen);
        for (int step = 0; step < 20; ++step) {
            relora::StepStats s = trainer.step(corpus.next(), kBatch, kLen);
            EXPECT(s.step == static_cast<std::uint64_t>(step) + 1);
            if (step < 5) first += s.loss / 5;
            if (step >= 15) last += s.loss / 5;
        }
        std::cout << "mean loss: first 5 steps " << first << ", last 5 steps " << last << "\n";
        EXPECT(last < first - 0.5);
        eval_after = trainer.eval(held_out, 8, kLen);
        EXPECT(eval_after < eval_before);
        EXPECT(trainer.phase() == 1);
        EXPECT(info_lines >= 2);

        // Wrong token counts are caught before the call.
        std::vector<std::int32_t> short_rows(10, 1);
        expect_error([&] { trainer.step(short_rows, kBatch, kLen); },
                     RELORA_STATUS_INVALID_ARGUMENT, "10 ids", __LINE__);
        // A progress callback that throws aborts the step; the exception comes back out.
        trainer.on_progress([](relora_progress_stage, std::uint64_t, std::uint64_t) -> bool {
            throw std::runtime_error("host says stop");
        });
        try {
            trainer.step(corpus.next(), kBatch, kLen);
            EXPECT(false);
        } catch (const std::runtime_error &e) {
            EXPECT(std::string(e.what()) == "host says stop");
        }
        trainer.on_progress(nullptr);
        EXPECT(trainer.step_count() == 20);

        std::vector<std::string> names = trainer.tensor_names();
        EXPECT(!names.empty() && names.front() == "model.embed_tokens.weight");
        std::vector<std::size_t> shape = trainer.tensor_shape(names.front());
        EXPECT(shape.size() == 2 && shape[0] == 258 && shape[1] == 64);
        std::vector<float> embed = trainer.tensor(names.front());
        trainer.set_tensor(names.front(), embed);
        trainer.save(work + "/ckpt", "{\"cursor\": " + std::to_string(corpus.cursor) + "}");
    }  // the trainer is freed here

    relora::Trainer resumed = relora::Trainer::load(work + "/ckpt");
    EXPECT(resumed.step_count() == 20);
    EXPECT(resumed.host_state().find("cursor") != std::string::npos);
    EXPECT(resumed.config("tokenizer") == "bytes");
    EXPECT(resumed.config_int("seq_len") == kSeq);
    EXPECT(std::fabs(resumed.eval(held_out, 8, kLen) - eval_after) < 1e-6);

    // Split form with a reducer lambda; a throwing reducer abandons the step and rethrows.
    relora::Trainer moved = std::move(resumed);
    std::size_t reduced = 0;
    for (int step = 0; step < 10; ++step) {
        float loss = moved.accumulate(corpus.next(), kBatch, kLen);
        EXPECT(std::isfinite(loss));
        relora::StepStats s = moved.apply([&](std::size_t index, std::string_view name,
                                              relora::Span<float> grad) {
            EXPECT(!name.empty() && !grad.empty());
            if (index == 0) reduced = 0;
            ++reduced;
        });
        EXPECT(s.step == static_cast<std::uint64_t>(21 + step));
    }
    EXPECT(reduced > 10);
    moved.accumulate(corpus.next(), kBatch, kLen);
    try {
        moved.apply([](std::size_t, std::string_view, relora::Span<float>) {
            throw std::logic_error("communicator down");
        });
        EXPECT(false);
    } catch (const std::logic_error &e) {
        EXPECT(std::string(e.what()) == "communicator down");
    }
    expect_error([&] { moved.apply(); }, RELORA_STATUS_INVALID_STATE, "accumulate", __LINE__);
    EXPECT(moved.step_count() == 30);
    EXPECT(moved.last_stats().loss < first);

    std::uint64_t phase = moved.phase();
    moved.merge();
    EXPECT(moved.phase() == phase + 1);
    moved.export_hf(work + "/hf");
    EXPECT(exists(work + "/hf/config.json"));
    EXPECT(exists(work + "/hf/model.safetensors"));
    expect_error([&] { moved.export_hf(work + "/hf"); }, RELORA_STATUS_OUTPUT_EXISTS,
                 "overwrite = true", __LINE__);
    moved.export_hf(work + "/hf", "bf16", 0, true);

    relora::TrainerPtr raw;  // the plain unique_ptr alias frees NULL without complaint
    if (failures != 0) {
        std::cerr << "c++ host: " << failures << " check(s) failed\n";
        return 1;
    }
    std::cout << "c++ host: all checks passed\n";
    return 0;
}
