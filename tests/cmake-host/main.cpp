// Trains a tiny model for a few steps through the installed C++ wrapper; exits non-zero on any
// failure.
#include <relora.hpp>

#include <cmath>
#include <cstdint>
#include <iostream>
#include <vector>

int main() {
    try {
        relora::Params params;
        params.set("preset", "tiny")
            .set_int("vocab_size", 64)
            .set_int("seq_len", 16)
            .set_int("batch_size", 2)
            .set_int("steps", 10)
            .set_int("warmup_steps", 1)
            .set_int("warmup_full_steps", 2)
            .set_int("reset_every", 2)
            .set_int("restart_warmup_steps", 1);
        relora::Trainer trainer(params);
        std::vector<std::int32_t> tokens(2 * 17);
        for (std::size_t i = 0; i < tokens.size(); ++i) {
            tokens[i] = static_cast<std::int32_t>((i * 5) % 64);
        }
        double first = 0, last = 0;
        for (int step = 0; step < 5; ++step) {
            relora::StepStats s = trainer.step(tokens, 2, 17);
            if (!std::isfinite(s.loss)) {
                std::cerr << "non-finite loss\n";
                return 1;
            }
            if (step == 0) first = s.loss;
            last = s.loss;
        }
        std::cout << "relora " << relora::version() << " via CMake: loss " << first << " -> "
                  << last << ", phase " << trainer.phase() << "\n";
        return last < first ? 0 : 1;
    } catch (const relora::Error &e) {
        std::cerr << "relora error " << e.status() << ": " << e.what() << "\n";
        return 1;
    }
}
