// A second translation unit that includes the wrapper: linking it with host.cpp proves the
// header defines nothing that breaks the one-definition rule.
#include "relora.hpp"

#include <string>

// The tokens of `text` as byte ids (the bytes tokenizer's ids).
std::vector<std::int32_t> byte_tokens(const std::string &text) {
    std::vector<std::int32_t> ids;
    ids.reserve(text.size());
    for (unsigned char c : text) {
        ids.push_back(static_cast<std::int32_t>(c));
    }
    return ids;
}

// Options for the C++ host's tiny ReLoRA run.
relora::Params tiny_params(int seq_len, int batch_size) {
    relora::Params p;
    p.set("preset", "tiny")
        .set("tokenizer", "bytes")
        .set_int("vocab_size", 258)
        .set_int("seq_len", seq_len)
        .set_int("batch_size", batch_size)
        .set_int("steps", 60)
        .set_int("warmup_steps", 2)
        .set_int("warmup_full_steps", 8)
        .set_int("reset_every", 6)
        .set_int("restart_warmup_steps", 2)
        .set_int("lora_rank", 8)
        .set_float("lr", 1e-2)
        .set_int("seed", 3);
    return p;
}
