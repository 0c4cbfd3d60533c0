// relora.hpp: a header-only C++17 wrapper over the relora C API (relora.h).
//
// - Handles are owned by std::unique_ptr with deleters (relora::ParamsPtr, relora::TrainerPtr)
//   and by the RAII classes relora::Params and relora::Trainer.
// - Every failing call throws relora::Error, which carries the relora_status and the library's
//   message for the failed call.
// - Inputs are taken as relora::Span<const T>, built from a std::vector, a std::array, a C array
//   or a pointer and a size.
// - Callbacks are std::function objects. An exception thrown by a progress or reduce callback
//   aborts the call it is in; one thrown by a logger is held until the call returns; either is
//   rethrown from that call. No exception ever unwinds through the C library.
//
// Thread safety is the C API's: one Trainer is used by one thread at a time; separate Trainers
// may be used in parallel. Everything here is inline, so the header can be included from any
// number of translation units.
#ifndef RELORA_HPP
#define RELORA_HPP

#include <array>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "relora.h"

namespace relora {

/// A failed call: the status and the library's message.
class Error : public std::runtime_error {
public:
    Error(relora_status status, const std::string &message)
        : std::runtime_error(message), status_(status) {}

    /// The status the C call returned.
    relora_status status() const noexcept { return status_; }

private:
    relora_status status_;
};

/// A read-only (or, with a non-const T, writable) view of contiguous elements, standing in for
/// C++20's std::span.
template <typename T>
class Span {
public:
    constexpr Span() noexcept = default;
    constexpr Span(T *data, std::size_t size) noexcept : data_(data), size_(size) {}
    template <std::size_t N>
    constexpr Span(T (&array)[N]) noexcept : data_(array), size_(N) {}
    /// Any contiguous container with data() and size() of a compatible element type.
    template <typename C,
              typename = std::enable_if_t<
                  !std::is_same_v<std::remove_cv_t<std::remove_reference_t<C>>, Span> &&
                  std::is_convertible_v<decltype(std::data(std::declval<C &>())), T *>>>
    constexpr Span(C &&container) noexcept
        : data_(std::data(container)), size_(std::size(container)) {}

    constexpr T *data() const noexcept { return data_; }
    constexpr std::size_t size() const noexcept { return size_; }
    constexpr bool empty() const noexcept { return size_ == 0; }
    constexpr T &operator[](std::size_t i) const noexcept { return data_[i]; }
    constexpr T *begin() const noexcept { return data_; }
    constexpr T *end() const noexcept { return data_ + size_; }

private:
    T *data_ = nullptr;
    std::size_t size_ = 0;
};

/// Severity of a log message (mirrors relora_log_level).
enum class LogLevel : int {
    Error = RELORA_LOG_LEVEL_ERROR,
    Warn = RELORA_LOG_LEVEL_WARN,
    Info = RELORA_LOG_LEVEL_INFO,
    Debug = RELORA_LOG_LEVEL_DEBUG,
};

/// Statistics of one optimizer step; struct_size is already set.
using StepStats = relora_step_stats;

/// The library's version string (e.g. "0.1.0").
inline std::string version() { return relora_version(); }

namespace detail {

/// This thread's last error message.
inline std::string last_error() {
    std::string text(relora_last_error_length() + 1, '\0');
    std::size_t written = 0;
    if (relora_last_error_message(&text[0], text.size(), &written) != RELORA_STATUS_OK) {
        return std::string();
    }
    text.resize(written);
    return text;
}

/// Throws relora::Error for a failed status.
inline void check(relora_status status) {
    if (status != RELORA_STATUS_OK) {
        std::string message = last_error();
        if (message.empty()) {
            message = relora_status_string(static_cast<int32_t>(status));
        }
        throw Error(status, message);
    }
}

/// Reads a text output through the C API's (buf, len, out_len) convention.
template <typename F>
std::string read_text(F &&call) {
    std::size_t len = 0;
    check(call(static_cast<char *>(nullptr), std::size_t{0}, &len));
    std::string text(len + 1, '\0');
    check(call(&text[0], text.size(), &len));
    text.resize(len);
    return text;
}

inline StepStats new_stats() {
    StepStats s{};
    s.struct_size = static_cast<std::uint32_t>(sizeof(StepStats));
    return s;
}

inline void check_tokens(std::size_t given, std::size_t batch, std::size_t len) {
    if (batch != 0 && given % batch == 0 && given / batch == len) {
        return;
    }
    throw Error(RELORA_STATUS_INVALID_ARGUMENT,
                "tokens holds " + std::to_string(given) + " ids, batch x len is " +
                    std::to_string(batch) + " x " + std::to_string(len));
}

struct ParamsDeleter {
    void operator()(relora_params *p) const noexcept { relora_params_free(p); }
};

struct TrainerDeleter {
    void operator()(relora_trainer *t) const noexcept { relora_trainer_free(t); }
};

}  // namespace detail

/// Owning pointers for code that uses the C API directly.
using ParamsPtr = std::unique_ptr<relora_params, detail::ParamsDeleter>;
using TrainerPtr = std::unique_ptr<relora_trainer, detail::TrainerDeleter>;

/// Trainer options, set by key (see relora_params_set for the keys).
class Params {
public:
    /// The defaults (relora_params_new).
    Params() {
        relora_params *p = nullptr;
        detail::check(relora_params_new(&p));
        ptr_.reset(p);
    }

    Params(const Params &other) {
        relora_params *p = nullptr;
        detail::check(relora_params_clone(other.handle(), &p));
        ptr_.reset(p);
    }

    Params &operator=(const Params &other) {
        if (this != &other) {
            Params copy(other);
            ptr_ = std::move(copy.ptr_);
        }
        return *this;
    }

    Params(Params &&) noexcept = default;
    Params &operator=(Params &&) noexcept = default;

    /// Sets a key from text.
    Params &set(const std::string &key, const std::string &value) {
        detail::check(relora_params_set(handle(), key.c_str(), value.c_str()));
        return *this;
    }

    /// Sets an integer (or real) key.
    Params &set_int(const std::string &key, std::int64_t value) {
        detail::check(relora_params_set_int(handle(), key.c_str(), value));
        return *this;
    }

    /// Sets a real key.
    Params &set_float(const std::string &key, double value) {
        detail::check(relora_params_set_float(handle(), key.c_str(), value));
        return *this;
    }

    /// Sets a boolean key.
    Params &set_bool(const std::string &key, bool value) {
        detail::check(relora_params_set_bool(handle(), key.c_str(), value));
        return *this;
    }

    /// Applies a JSON configuration file (relora_params_load_file).
    Params &load_file(const std::string &path) {
        detail::check(relora_params_load_file(handle(), path.c_str()));
        return *this;
    }

    /// A key's value as text.
    std::string get(const std::string &key) const {
        return detail::read_text([&](char *buf, std::size_t len, std::size_t *out_len) {
            return relora_params_get(handle(), key.c_str(), buf, len, out_len);
        });
    }

    /// An integer key's value.
    std::int64_t get_int(const std::string &key) const {
        std::int64_t v = 0;
        detail::check(relora_params_get_int(handle(), key.c_str(), &v));
        return v;
    }

    /// An integer or real key's value.
    double get_float(const std::string &key) const {
        double v = 0;
        detail::check(relora_params_get_float(handle(), key.c_str(), &v));
        return v;
    }

    /// Checks the options as trainer creation will.
    void validate() const { detail::check(relora_params_validate(handle())); }

    /// The C handle (still owned by this object).
    relora_params *handle() const noexcept { return ptr_.get(); }

private:
    ParamsPtr ptr_;
};

/// A ReLoRA trainer.
class Trainer {
public:
    /// Receives log messages.
    using LogFn = std::function<void(LogLevel, std::string_view)>;
    /// Reports progress; return false to abort the call (which then throws
    /// Error(RELORA_STATUS_ABORTED)).
    using ProgressFn = std::function<bool(relora_progress_stage, std::uint64_t, std::uint64_t)>;
    /// Reduces one trainable parameter's gradient in place (e.g. an all-reduce).
    using ReduceFn = std::function<void(std::size_t, std::string_view, Span<float>)>;

    /// A new trainer (relora_trainer_new).
    explicit Trainer(const Params &params) : cb_(new Callbacks()) {
        relora_trainer *t = nullptr;
        detail::check(relora_trainer_new(params.handle(), &t));
        ptr_.reset(t);
    }

    /// A trainer resumed from a checkpoint directory (relora_trainer_load).
    static Trainer load(const std::string &dir, const std::string &device = "cpu") {
        relora_trainer *t = nullptr;
        detail::check(relora_trainer_load(dir.c_str(), device.c_str(), &t));
        return Trainer(TrainerPtr(t));
    }

    Trainer(Trainer &&) noexcept = default;
    Trainer &operator=(Trainer &&) noexcept = default;
    Trainer(const Trainer &) = delete;
    Trainer &operator=(const Trainer &) = delete;

    /// One optimizer step on batch rows of len tokens (len = seq_len + 1).
    StepStats step(Span<const std::int32_t> tokens, std::size_t batch, std::size_t len) {
        detail::check_tokens(tokens.size(), batch, len);
        StepStats s = detail::new_stats();
        check(relora_trainer_step(handle(), tokens.data(), batch, len, &s));
        return s;
    }

    /// Forward + backward of one micro-batch; returns its loss.
    float accumulate(Span<const std::int32_t> tokens, std::size_t batch, std::size_t len) {
        detail::check_tokens(tokens.size(), batch, len);
        float loss = 0;
        check(relora_trainer_accumulate(handle(), tokens.data(), batch, len, &loss));
        return loss;
    }

    /// Finishes a split step without a reducer.
    StepStats apply() {
        StepStats s = detail::new_stats();
        check(relora_trainer_apply(handle(), nullptr, nullptr, &s));
        return s;
    }

    /// Finishes a split step, passing every trainable gradient to `reduce` first.
    StepStats apply(const ReduceFn &reduce) {
        ReduceState state{&reduce, nullptr};
        StepStats s = detail::new_stats();
        relora_status st = relora_trainer_apply(handle(), &Trainer::reduce_trampoline, &state, &s);
        if (state.error) {
            std::rethrow_exception(state.error);
        }
        check(st);
        return s;
    }

    /// Mean next-token loss on batch rows of len tokens.
    double eval(Span<const std::int32_t> tokens, std::size_t batch, std::size_t len) const {
        detail::check_tokens(tokens.size(), batch, len);
        double loss = 0;
        check(relora_trainer_eval(handle(), tokens.data(), batch, len, &loss));
        return loss;
    }

    /// Saves a checkpoint; `host_state` is JSON text (empty: none).
    void save(const std::string &dir, const std::string &host_state = std::string()) const {
        check(relora_trainer_save(handle(), dir.c_str(),
                                  host_state.empty() ? nullptr : host_state.c_str()));
    }

    /// Merges the adapters into the weights now.
    void merge() { check(relora_trainer_merge(handle())); }

    /// Exports the merged model as a Hugging Face directory.
    void export_hf(const std::string &dir, const std::string &dtype = "f32",
                   std::uint64_t max_shard_bytes = 0, bool overwrite = false) const {
        check(relora_trainer_export(handle(), dir.c_str(), dtype.c_str(), max_shard_bytes,
                                    overwrite));
    }

    std::uint64_t step_count() const {
        std::uint64_t v = 0;
        check(relora_trainer_step_count(handle(), &v));
        return v;
    }

    std::uint64_t phase() const {
        std::uint64_t v = 0;
        check(relora_trainer_phase(handle(), &v));
        return v;
    }

    std::uint64_t skipped_steps() const {
        std::uint64_t v = 0;
        check(relora_trainer_skipped_steps(handle(), &v));
        return v;
    }

    double current_lr() const {
        double v = 0;
        check(relora_trainer_current_lr(handle(), &v));
        return v;
    }

    /// Statistics of the last applied step.
    StepStats last_stats() const {
        StepStats s = detail::new_stats();
        check(relora_trainer_last_stats(handle(), &s));
        return s;
    }

    /// The host state saved with the checkpoint this trainer was loaded from ("" if none).
    std::string host_state() const {
        return detail::read_text([&](char *buf, std::size_t len, std::size_t *out_len) {
            return relora_trainer_host_state(handle(), buf, len, out_len);
        });
    }

    /// One of the trainer's options as text.
    std::string config(const std::string &key) const {
        return detail::read_text([&](char *buf, std::size_t len, std::size_t *out_len) {
            return relora_trainer_config_get(handle(), key.c_str(), buf, len, out_len);
        });
    }

    std::int64_t config_int(const std::string &key) const {
        std::int64_t v = 0;
        check(relora_trainer_config_get_int(handle(), key.c_str(), &v));
        return v;
    }

    double config_float(const std::string &key) const {
        double v = 0;
        check(relora_trainer_config_get_float(handle(), key.c_str(), &v));
        return v;
    }

    /// The names of all parameters, in the library's order.
    std::vector<std::string> tensor_names() const {
        std::size_t count = 0;
        check(relora_trainer_tensor_count(handle(), &count));
        std::vector<std::string> names;
        names.reserve(count);
        for (std::size_t i = 0; i < count; ++i) {
            names.push_back(detail::read_text([&](char *buf, std::size_t len, std::size_t *n) {
                return relora_trainer_tensor_name(handle(), i, buf, len, n);
            }));
        }
        return names;
    }

    /// A parameter's dimensions.
    std::vector<std::size_t> tensor_shape(const std::string &name) const {
        std::size_t rank = 0;
        check(relora_trainer_tensor_shape(handle(), name.c_str(), nullptr, 0, &rank));
        std::vector<std::size_t> dims(rank);
        check(relora_trainer_tensor_shape(handle(), name.c_str(), dims.data(), dims.size(),
                                          &rank));
        return dims;
    }

    /// A copy of a parameter as f32.
    std::vector<float> tensor(const std::string &name) const {
        std::size_t n = 0;
        check(relora_trainer_tensor_numel(handle(), name.c_str(), &n));
        std::vector<float> values(n);
        check(relora_trainer_tensor_get(handle(), name.c_str(), values.data(), values.size()));
        return values;
    }

    /// Overwrites a parameter from f32 values.
    void set_tensor(const std::string &name, Span<const float> values) {
        check(relora_trainer_tensor_set(handle(), name.c_str(), values.data(), values.size()));
    }

    /// Installs a logger (an empty function removes it).
    void on_log(LogFn fn, LogLevel max_level = LogLevel::Info) {
        cb_->log = std::move(fn);
        check(relora_trainer_set_log_callback(handle(),
                                              cb_->log ? &Trainer::log_trampoline : nullptr,
                                              cb_.get(), static_cast<std::uint32_t>(max_level)));
    }

    /// Installs a progress callback (an empty function removes it).
    void on_progress(ProgressFn fn) {
        cb_->progress = std::move(fn);
        check(relora_trainer_set_progress_callback(
            handle(), cb_->progress ? &Trainer::progress_trampoline : nullptr, cb_.get()));
    }

    /// The C handle (still owned by this object).
    relora_trainer *handle() const noexcept { return ptr_.get(); }

private:
    /// Lives on the heap so its address, given to the library, survives moves of the Trainer.
    struct Callbacks {
        LogFn log;
        ProgressFn progress;
        std::exception_ptr error;
    };

    struct ReduceState {
        const ReduceFn *fn;
        std::exception_ptr error;
    };

    explicit Trainer(TrainerPtr ptr) : cb_(new Callbacks()), ptr_(std::move(ptr)) {}

    /// Rethrows an exception a callback raised during the call, else checks the status.
    void check(relora_status status) const {
        if (cb_->error) {
            std::exception_ptr e = cb_->error;
            cb_->error = nullptr;
            std::rethrow_exception(e);
        }
        detail::check(status);
    }

    static void log_trampoline(void *user_data, relora_log_level level, const char *message) {
        Callbacks *cb = static_cast<Callbacks *>(user_data);
        try {
            cb->log(static_cast<LogLevel>(level), std::string_view(message));
        } catch (...) {
            if (!cb->error) {
                cb->error = std::current_exception();
            }
        }
    }

    static bool progress_trampoline(void *user_data, relora_progress_stage stage,
                                    std::uint64_t done, std::uint64_t total) {
        Callbacks *cb = static_cast<Callbacks *>(user_data);
        try {
            return cb->progress(stage, done, total);
        } catch (...) {
            cb->error = std::current_exception();
            return false;
        }
    }

    static bool reduce_trampoline(void *user_data, std::size_t index, const char *name,
                                  float *grad, std::size_t len) {
        ReduceState *state = static_cast<ReduceState *>(user_data);
        try {
            (*state->fn)(index, std::string_view(name), Span<float>(grad, len));
            return true;
        } catch (...) {
            state->error = std::current_exception();
            return false;
        }
    }

    // Declared before ptr_ so the trainer is freed before the callbacks it points to.
    std::unique_ptr<Callbacks> cb_;
    TrainerPtr ptr_;
};

}  // namespace relora

#endif  // RELORA_HPP
