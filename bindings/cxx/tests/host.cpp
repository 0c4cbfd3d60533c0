// A C++ host of the cxx bridge, beside the C ABI through relora.hpp in the same program:
//
// - the tiny preset trained through the bridge and through relora.hpp on the same batches and
//   seed gives the same losses, bit for bit; a save, load and resume through the bridge
//   continues bit for bit, and the host state comes back byte for byte;
// - bad input (an unknown option, a token id >= vocab, a wrong slice length, a corrupt
//   checkpoint) throws rust::Error with the message the C API gives, and the host carries on;
// - two trainers joined by a C++ communicator (an in-memory all-reduce over two threads) end with
//   the same weights as one trainer on the combined batch; a communicator that throws fails the
//   step, and the trainer stays usable.
//
// usage: cxx_host WORKDIR
#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "relora_cxx/communicator.h"
#include "relora-cxx/src/lib.rs.h"
#include "relora.hpp"

namespace bridge = relora::bridge;

namespace {

int failures = 0;

void expect(bool ok, const std::string &what, int line) {
    if (!ok) {
        std::cerr << "host.cpp:" << line << ": check failed: " << what << "\n";
        ++failures;
    }
}

#define EXPECT(cond) expect((cond), #cond, __LINE__)

constexpr int kVocab = 64;
constexpr int kSeq = 8;
constexpr int kLen = kSeq + 1;
constexpr int kBatch = 4;
constexpr int kSteps = 12;

// The options of both faces: the same keys and values.
const std::vector<std::pair<std::string, std::string>> kOptions = {
    {"preset", "tiny"},          {"vocab_size", "64"},   {"seq_len", "8"},
    {"batch_size", "4"},         {"steps", "40"},        {"warmup_steps", "1"},
    {"warmup_full_steps", "3"},  {"reset_every", "4"},   {"restart_warmup_steps", "1"},
    {"lora_rank", "4"},          {"seed", "7"},
};

rust::Box<bridge::Trainer> bridge_trainer(
    const std::vector<std::pair<std::string, std::string>> &options) {
    std::vector<bridge::KeyValue> kv;
    for (const auto &o : options) {
        kv.push_back(bridge::KeyValue{rust::String(o.first), rust::String(o.second)});
    }
    return bridge::new_trainer(rust::Slice<const bridge::KeyValue>(kv.data(), kv.size()));
}

relora::Trainer c_trainer() {
    relora::Params p;
    for (const auto &o : kOptions) {
        p.set(o.first, o.second);
    }
    return relora::Trainer(p);
}

// Step `s`'s rows: deterministic ids below kVocab.
std::vector<std::int32_t> rows(int s, int batch = kBatch) {
    std::vector<std::int32_t> v(static_cast<std::size_t>(batch) * kLen);
    for (std::size_t i = 0; i < v.size(); ++i) {
        v[i] = static_cast<std::int32_t>((i * 7 + static_cast<std::size_t>(s) * 13 + 3) % kVocab);
    }
    return v;
}

rust::Slice<const std::int32_t> slice(const std::vector<std::int32_t> &v) {
    return rust::Slice<const std::int32_t>(v.data(), v.size());
}

bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

// Runs `body`, which must throw rust::Error with exactly `message`; returns what it threw.
template <typename F>
std::string expect_error(F &&body, const std::string &message, int line) {
    try {
        body();
        expect(false, "no exception (expected: " + message + ")", line);
    } catch (const rust::Error &e) {
        expect(e.what() == message, std::string("message: ") + e.what() + "\n  expected: " + message,
               line);
        return e.what();
    }
    return std::string();
}

// The C API's message for a call that must fail.
template <typename F>
std::string c_error(F &&body) {
    try {
        body();
    } catch (const relora::Error &e) {
        return e.what();
    }
    return "(no error)";
}

void same_losses_as_the_c_abi_and_exact_resume(const std::string &work) {
    auto b = bridge_trainer(kOptions);
    relora::Trainer c = c_trainer();
    std::vector<double> bridge_losses;
    for (int s = 0; s < kSteps; ++s) {
        auto r = rows(s);
        bridge::StepStats sb = b->step(slice(r), kBatch, kLen);
        relora::StepStats sc = c.step(r, kBatch, kLen);
        EXPECT(same_bits(sb.loss, sc.loss));
        EXPECT(same_bits(sb.lr, sc.lr) && same_bits(sb.grad_norm, sc.grad_norm));
        EXPECT(sb.step == sc.step && sb.merged == sc.merged && sb.switched == sc.switched);
        bridge_losses.push_back(sb.loss);
    }
    EXPECT(b->phase() >= 1);  // the comparison crosses the switch and a merge
    std::cout << "bridge vs C ABI: " << kSteps << " steps, losses equal bit for bit (last "
              << bridge_losses.back() << ")\n";

    // Save half-way, load, resume: the same losses as straight through.
    auto half = bridge_trainer(kOptions);
    for (int s = 0; s < kSteps / 2; ++s) {
        auto r = rows(s);
        half->step(slice(r), kBatch, kLen);
    }
    const std::string state = "{\"cursor\": 123456789012345678901234567890,  \"file\": \"a\"}";
    half->save(work + "/ckpt", state);
    auto resumed = bridge::load_trainer(work + "/ckpt", "");
    EXPECT(std::string(resumed->host_state()) == state);
    EXPECT(resumed->step_count() == static_cast<std::uint64_t>(kSteps / 2));
    for (int s = kSteps / 2; s < kSteps; ++s) {
        auto r = rows(s);
        EXPECT(same_bits(resumed->step(slice(r), kBatch, kLen).loss,
                         bridge_losses[static_cast<std::size_t>(s)]));
    }
    // The bridge reads the C ABI's checkpoints and the other way round.
    relora::Trainer from_bridge = relora::Trainer::load(work + "/ckpt");
    EXPECT(from_bridge.host_state() == state);
    resumed->export_hf(work + "/hf", "bf16", 0, false);
    std::ifstream config(work + "/hf/config.json");
    EXPECT(config.good());
}

void bad_input_throws_the_c_apis_messages(const std::string &work) {
    // An unknown option.
    auto opts = kOptions;
    opts.emplace_back("learning_rate", "0.1");
    std::string c_msg = c_error([] {
        relora::Params p;
        p.set("learning_rate", "0.1");
    });
    std::string b_msg = expect_error([&] { bridge_trainer(opts); },
                                     "relora_trainer_new: unknown parameter 'learning_rate'",
                                     __LINE__);
    // The C API names the call it failed in; the detail is the same.
    EXPECT(c_msg.substr(c_msg.find(": ")) == b_msg.substr(b_msg.find(": ")));

    auto b = bridge_trainer(kOptions);
    relora::Trainer c = c_trainer();
    auto r = rows(0);
    r[7] = kVocab;  // an id outside the vocabulary
    std::string expected = c_error([&] { c.step(r, kBatch, kLen); });
    expect_error([&] { b->step(slice(r), kBatch, kLen); }, expected, __LINE__);
    // A slice shorter than batch x len.
    auto short_rows = rows(0);
    short_rows.pop_back();
    expect_error([&] { b->step(slice(short_rows), kBatch, kLen); },
                 "relora_trainer_step: 35 token ids given, batch 4 x len 9 is 36", __LINE__);
    // A corrupt checkpoint.
    b->save(work + "/corrupt", "");
    {
        std::ofstream f(work + "/corrupt/params.safetensors", std::ios::binary | std::ios::trunc);
        f << "not tensors";
    }
    expected = c_error([&] { relora::Trainer::load(work + "/corrupt"); });
    std::string got = expect_error([&] { bridge::load_trainer(work + "/corrupt", "cpu"); },
                                   expected, __LINE__);
    EXPECT(got.find("params.safetensors") != std::string::npos);
    // After all that, the trainer carries on.
    auto good = rows(1);
    EXPECT(b->step(slice(good), kBatch, kLen).step == 1);
}

// An in-memory all-reduce over two threads: each rank posts its buffer, the second to arrive
// sums both, each copies the sum back, and the next round starts once both have.
class TwoRanks {
public:
    void all_reduce_sum(int rank, rust::Slice<float> values) {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [&] { return !ready_; });  // the previous round is drained
        bufs_[rank] = values.data();
        lens_[rank] = values.size();
        if (++arrived_ == 2) {
            mismatch_ = lens_[0] != lens_[1];
            sum_.assign(lens_[0], 0.0f);
            for (int k = 0; k < 2 && !mismatch_; ++k) {
                for (std::size_t i = 0; i < lens_[k]; ++i) {
                    sum_[i] += bufs_[k][i];
                }
            }
            arrived_ = 0;
            ready_ = true;
            cv_.notify_all();
        } else {
            cv_.wait(lock, [&] { return ready_; });
        }
        bool mismatch = mismatch_;
        if (!mismatch) {
            std::copy(sum_.begin(), sum_.end(), values.begin());
        }
        if (++copied_ == 2) {
            copied_ = 0;
            ready_ = false;
            cv_.notify_all();
        }
        if (mismatch) {
            throw std::runtime_error("the ranks reduced buffers of different lengths");
        }
    }

private:
    std::mutex mutex_;
    std::condition_variable cv_;
    float *bufs_[2] = {nullptr, nullptr};
    std::size_t lens_[2] = {0, 0};
    int arrived_ = 0;
    int copied_ = 0;
    bool ready_ = false;
    bool mismatch_ = false;
    std::vector<float> sum_;
};

class Rank : public bridge::Communicator {
public:
    Rank(TwoRanks &shared, int rank) : shared_(shared), rank_(rank) {}
    void all_reduce_sum(rust::Slice<float> values) override { shared_.all_reduce_sum(rank_, values); }
    std::size_t world_size() const override { return 2; }

private:
    TwoRanks &shared_;
    int rank_;
};

class Broken : public bridge::Communicator {
public:
    void all_reduce_sum(rust::Slice<float>) override { throw std::runtime_error("link down"); }
    std::size_t world_size() const override { return 2; }
};

double max_difference(const bridge::Trainer &a, const bridge::Trainer &b) {
    double worst = 0.0;
    rust::Vec<rust::String> names = a.tensor_names();
    for (const auto &name : names) {
        std::string n(name);
        std::size_t count = a.tensor_numel(n);
        std::vector<float> va(count), vb(count);
        a.tensor_get(n, rust::Slice<float>(va.data(), va.size()));
        b.tensor_get(n, rust::Slice<float>(vb.data(), vb.size()));
        for (std::size_t i = 0; i < count; ++i) {
            double d = std::fabs(static_cast<double>(va[i]) - static_cast<double>(vb[i]));
            if (!(d <= worst)) {
                worst = d;  // also catches NaN
            }
        }
    }
    return worst;
}

void two_ranks_through_a_cpp_communicator_match_one_trainer() {
    // Averaged gradients differ from the whole batch's by rounding; eps keeps Adam from
    // magnifying pure rounding noise (as the C all-reduce test does).
    auto opts = kOptions;
    opts.emplace_back("lr", "0.001");
    opts.emplace_back("eps", "0.001");
    auto whole = bridge_trainer(opts);
    auto r0 = bridge_trainer(opts);
    auto r1 = bridge_trainer(opts);
    constexpr int kHalf = kBatch / 2;
    for (int s = 0; s < kSteps; ++s) {
        auto r = rows(s);
        whole->accumulate(slice(r), kBatch, kLen);
        whole->apply();
    }
    TwoRanks shared;
    Rank c0(shared, 0), c1(shared, 1);
    auto run = [&](bridge::Trainer &t, Rank &comm, int rank) {
        for (int s = 0; s < kSteps; ++s) {
            auto r = rows(s);
            std::vector<std::int32_t> mine(r.begin() + rank * kHalf * kLen,
                                           r.begin() + (rank + 1) * kHalf * kLen);
            t.accumulate(slice(mine), kHalf, kLen);
            t.apply_with(comm);
        }
    };
    std::thread t0([&] { run(*r0, c0, 0); });
    std::thread t1([&] { run(*r1, c1, 1); });
    t0.join();
    t1.join();
    double ranks = max_difference(*r0, *r1);
    double vs_whole = max_difference(*r0, *whole);
    std::cout << "two ranks through a C++ communicator: max |rank0 - rank1| = " << ranks
              << ", max |rank0 - whole batch| = " << vs_whole << "\n";
    EXPECT(ranks == 0.0);
    EXPECT(vs_whole <= 1e-6);
    EXPECT(whole->phase() >= 1);

    // A communicator that throws fails the step; nothing is applied and the trainer goes on.
    Broken broken;
    auto r = rows(0);
    std::uint64_t before = r0->step_count();
    r0->accumulate(slice(r), kBatch, kLen);
    try {
        r0->apply_with(broken);
        EXPECT(false);
    } catch (const rust::Error &e) {
        std::string what = e.what();
        EXPECT(what.find("relora_trainer_apply: the communicator's all_reduce_sum threw") == 0);
        EXPECT(what.find("link down") != std::string::npos);
    }
    EXPECT(r0->step_count() == before);
    EXPECT(r0->step(slice(r), kBatch, kLen).step == before + 1);
}

}  // namespace

int main(int argc, char **argv) {
    if (argc != 2) {
        std::cerr << "usage: " << argv[0] << " WORKDIR\n";
        return 2;
    }
    const std::string work = argv[1];
    try {
        EXPECT(std::string(bridge::version()) == relora::version());
        same_losses_as_the_c_abi_and_exact_resume(work);
        bad_input_throws_the_c_apis_messages(work);
        two_ranks_through_a_cpp_communicator_match_one_trainer();
    } catch (const std::exception &e) {
        std::cerr << "unexpected exception: " << e.what() << "\n";
        return 1;
    }
    if (failures != 0) {
        std::cerr << "cxx host: " << failures << " check(s) failed\n";
        return 1;
    }
    std::cout << "cxx host: all checks passed\n";
    return 0;
}
