// Runs the CUDA kernels of src/ops/kernels.cu on the CPU, so that tests on a machine without a
// GPU execute the kernels' own source: their indexing, their grid-stride loops, their block
// reductions and their bf16 rounding (tests/kernels_emulated.rs).
//
// Model of the hardware, as much of CUDA as kernels.cu uses:
// - every CUDA thread of a block is a fiber (ucontext) with its own stack; one OS thread runs
//   them, switching at each barrier, so a block's threads interleave as a GPU may interleave
//   them, and a run is deterministic;
// - __syncthreads waits for every thread of the block; a thread that returns while others wait
//   there is reported as an error (undefined behaviour on a GPU), as is any deadlock;
// - __shfl_xor_sync waits for the 32 lanes of the warp, with a full mask only;
// - blocks run one after another (kernels.cu has no atomics and no inter-block communication);
// - each buffer is mapped with inaccessible pages after its end and canaries in its slack, so
//   a read or write outside it stops the run with a message naming the kernel, instead of
//   silently reading a neighbour as it might on a GPU;
// - arithmetic is the host's f32 (expf, sqrtf, logf of the C library): not bit-identical to the
//   GPU's, within a few ulp, which the tests' tolerances allow.
//
// Usage: emulator REQUEST RESPONSE, or emulator --list (the kernels it knows, one a line).
// REQUEST is a text header, then the line `data`, then every buffer's bytes in order:
//   buffer LEN                       a buffer of LEN bytes (index from 0, in order)
//   reloc BUF POS TARGET OFFSET      write the address of TARGET + OFFSET at byte POS of BUF
//   launch NAME GX GY GZ BX BY BZ    then one line per kernel parameter, in order:
//   arg buf INDEX OFFSET | arg i32 V | arg u64 V | arg f32 HEXBITS
// Launches run in order; RESPONSE gets every buffer's bytes afterwards, in order.

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

struct uint3 {
    unsigned x, y, z;
};
typedef uint3 dim3;

namespace emu {

[[noreturn]] void fail(const std::string& what) {
    std::cerr << "emulator: " << what << std::endl;
    std::exit(2);
}

uint3 thread_idx, block_idx;
dim3 block_dim, grid_dim;

enum class State { Ready, AtBlockBarrier, AtWarpBarrier, Done };

struct Fiber {
    ucontext_t ctx;
    State state;
    uint3 tid;
    unsigned shuffles;
};

constexpr size_t STACK = 64 * 1024;
std::vector<Fiber> fibers;
std::vector<std::vector<char>> stacks;
size_t current;
ucontext_t scheduler;
std::function<void()> body;
// The values each lane offers to a shuffle: [warp][2][32], alternating between two sets so that
// a lane can write its next shuffle's value while a slower lane still reads the last one.
std::vector<uint64_t> offered;
std::string kernel_name;

void fiber_main() {
    body();
    fibers[current].state = State::Done;
}

void wait(State s) {
    fibers[current].state = s;
    swapcontext(&fibers[current].ctx, &scheduler);
}

std::string where() {
    std::ostringstream o;
    o << kernel_name << ", block (" << block_idx.x << "," << block_idx.y << "," << block_idx.z
      << ")";
    return o.str();
}

void run_block() {
    const size_t n = (size_t)block_dim.x * block_dim.y * block_dim.z;
    if (stacks.size() < n) stacks.resize(n);
    fibers.assign(n, Fiber{});
    offered.assign((n + 31) / 32 * 64, 0);
    for (size_t i = 0; i < n; i++) {
        if (stacks[i].empty()) stacks[i].resize(STACK);
        Fiber& f = fibers[i];
        f.tid = uint3{(unsigned)(i % block_dim.x), (unsigned)(i / block_dim.x % block_dim.y),
                      (unsigned)(i / ((size_t)block_dim.x * block_dim.y))};
        f.state = State::Ready;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stacks[i].data();
        f.ctx.uc_stack.ss_size = STACK;
        f.ctx.uc_link = &scheduler;
        makecontext(&f.ctx, fiber_main, 0);
    }
    for (;;) {
        bool progressed = false;
        for (size_t i = 0; i < n; i++) {
            if (fibers[i].state != State::Ready) continue;
            current = i;
            thread_idx = fibers[i].tid;
            swapcontext(&scheduler, &fibers[i].ctx);
            progressed = true;
        }
        size_t done = 0, at_block = 0;
        for (const Fiber& f : fibers) {
            done += f.state == State::Done;
            at_block += f.state == State::AtBlockBarrier;
        }
        if (done == n) return;
        if (at_block == n) {
            for (Fiber& f : fibers) f.state = State::Ready;
            continue;
        }
        if (at_block > 0 && done > 0)
            fail(where() + ": a thread returned while others wait at __syncthreads");
        for (size_t w = 0; w * 32 < n; w++) {
            size_t lanes = std::min<size_t>(32, n - w * 32), waiting = 0;
            for (size_t l = 0; l < lanes; l++)
                waiting += fibers[w * 32 + l].state == State::AtWarpBarrier;
            if (waiting != lanes) continue;
            for (size_t l = 0; l < lanes; l++) fibers[w * 32 + l].state = State::Ready;
            progressed = true;
        }
        if (!progressed)
            fail(where() + ": deadlock, threads wait at barriers that the others never reach");
    }
}

template <class T>
T shuffle_xor(unsigned mask, T v, int lane_mask) {
    static_assert(sizeof(T) <= 8, "shuffled values are at most 8 bytes");
    const size_t n = fibers.size();
    if (mask != 0xffffffffu) fail(where() + ": __shfl_xor_sync with a partial mask");
    if (n % 32 != 0) fail(where() + ": __shfl_xor_sync in a block that is not whole warps");
    Fiber& f = fibers[current];
    const size_t warp = current / 32, lane = current % 32;
    const size_t set = f.shuffles++ & 1u;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    offered[(warp * 2 + set) * 32 + lane] = bits;
    wait(State::AtWarpBarrier);
    uint64_t got = offered[(warp * 2 + set) * 32 + (lane ^ ((size_t)lane_mask & 31u))];
    T out;
    std::memcpy(&out, &got, sizeof(T));
    return out;
}

// A buffer between inaccessible pages: its last byte (after rounding its length up to 8) ends a
// page, and the slack before and after it holds a canary that must survive every launch.
struct Buffer {
    char* data;
    size_t len;
    char* map;
    size_t map_len;
    size_t padded;
};

constexpr unsigned char CANARY = 0xa5;

Buffer allocate(size_t len) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t padded = (len + 7) / 8 * 8;
    const size_t body_pages = (padded + page - 1) / page * page;
    const size_t map_len = body_pages + 2 * page;
    void* m = mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) fail("out of memory");
    char* map = (char*)m;
    mprotect(map, page, PROT_NONE);
    mprotect(map + page + body_pages, page, PROT_NONE);
    std::memset(map + page, CANARY, body_pages);
    return Buffer{map + page + body_pages - padded, len, map, map_len, padded};
}

bool canaries_intact(const Buffer& b) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    for (char* p = b.map + page; p < b.data; p++)
        if ((unsigned char)*p != CANARY) return false;
    for (size_t i = b.len; i < b.padded; i++)
        if ((unsigned char)b.data[i] != CANARY) return false;
    return true;
}

std::vector<Buffer> buffers;

struct Arg {
    std::string kind;
    uint64_t a = 0, b = 0;
};

template <class P>
constexpr const char* scalar_kind() {
    if constexpr (std::is_same_v<P, int>) return "i32";
    else if constexpr (std::is_same_v<P, unsigned long long>) return "u64";
    else if constexpr (std::is_same_v<P, float>) return "f32";
    else static_assert(!sizeof(P), "a kernel parameter type the emulator does not know");
}

template <class P>
P convert(const Arg& arg, size_t i) {
    const std::string at = kernel_name + ", parameter " + std::to_string(i);
    if constexpr (std::is_pointer_v<P>) {
        using T = std::remove_cv_t<std::remove_pointer_t<P>>;
        if (arg.kind != "buf") fail(at + ": expected a buffer, got " + arg.kind);
        if (arg.a >= buffers.size()) fail(at + ": no buffer " + std::to_string(arg.a));
        const Buffer& b = buffers[arg.a];
        if (arg.b > b.len) fail(at + ": offset past the buffer's end");
        char* p = b.data + arg.b;
        if ((uintptr_t)p % alignof(T) != 0) fail(at + ": misaligned buffer offset");
        return reinterpret_cast<P>(p);
    } else {
        if (arg.kind != scalar_kind<P>())
            fail(at + ": expected " + scalar_kind<P>() + ", got " + arg.kind);
        P v;
        std::memcpy(&v, &arg.a, sizeof(P));
        return v;
    }
}

template <class... P, size_t... I>
std::tuple<P...> convert_all(const std::vector<Arg>& args, std::index_sequence<I...>) {
    return std::tuple<P...>{convert<P>(args[I], I)...};
}

// A launcher for kernel `k`: converts the request's arguments to its parameter types, checking
// each against the parameter it fills, and runs the grid.
template <class... P>
std::function<void(const dim3&, const dim3&, const std::vector<Arg>&)> launcher(void (*k)(P...)) {
    return [k](const dim3& grid, const dim3& block, const std::vector<Arg>& args) {
        if (args.size() != sizeof...(P))
            fail(kernel_name + ": " + std::to_string(sizeof...(P)) + " parameters, " +
                 std::to_string(args.size()) + " arguments");
        std::tuple<P...> values = convert_all<P...>(args, std::index_sequence_for<P...>{});
        body = [&] { std::apply(k, values); };
        grid_dim = grid;
        block_dim = block;
        for (unsigned z = 0; z < grid.z; z++)
            for (unsigned y = 0; y < grid.y; y++)
                for (unsigned x = 0; x < grid.x; x++) {
                    block_idx = uint3{x, y, z};
                    run_block();
                }
    };
}

}  // namespace emu

// What kernels.cu takes from CUDA, defined for the host.
#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim
#define __global__
#define __device__
#define __forceinline__ inline
// Shared memory is one per block; blocks run one at a time, so one static array serves all.
#define __shared__ static

inline void __syncthreads() { emu::wait(emu::State::AtBlockBarrier); }
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    return emu::shuffle_xor(mask, v, lane_mask);
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}

#include "kernels.cu"

#undef __shared__
#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim

namespace {

// Every kernel of kernels.cu; tests/kernels_emulated.rs checks this list against the file.
#define KERNELS(X)                                                                              \
    X(swiglu_fwd) X(swiglu_bwd) X(add_scaled) X(rms_fwd) X(rms_bwd) X(col_sum)                  \
    X(causal_softmax_fwd) X(causal_softmax_bwd) X(adamw_moments) X(adamw_apply) X(adamw_group)  \
    X(sum_squares_group) X(sum_f64) X(rotary) X(causal_softmax_fwd_bf16)                        \
    X(causal_softmax_bwd_bf16) X(cross_entropy_fwd) X(cross_entropy_bwd) X(add_scaled_to_bf16)

using Launcher = std::function<void(const dim3&, const dim3&, const std::vector<emu::Arg>&)>;

std::map<std::string, Launcher> kernels() {
    std::map<std::string, Launcher> k;
#define ENTRY(name) k[#name] = emu::launcher(name);
    KERNELS(ENTRY)
#undef ENTRY
    return k;
}

void on_fault(int) {
    const char* a = "emulator: kernel ";
    const char* b = " touched memory outside its buffers\n";
    ssize_t r = write(2, a, std::strlen(a));
    r = write(2, emu::kernel_name.c_str(), emu::kernel_name.size());
    r = write(2, b, std::strlen(b));
    (void)r;
    _exit(3);
}

struct Launch {
    std::string name;
    dim3 grid, block;
    std::vector<emu::Arg> args;
};

struct Reloc {
    uint64_t buf, pos, target, offset;
};

}  // namespace

int main(int argc, char** argv) {
    const auto table = kernels();
    if (argc == 2 && std::string(argv[1]) == "--list") {
        for (const auto& k : table) std::cout << k.first << "\n";
        return 0;
    }
    if (argc != 3) emu::fail("usage: emulator REQUEST RESPONSE | emulator --list");
    std::ifstream in(argv[1], std::ios::binary);
    if (!in) emu::fail(std::string("cannot read ") + argv[1]);
    std::vector<size_t> lens;
    std::vector<Reloc> relocs;
    std::vector<Launch> launches;
    std::string line;
    while (std::getline(in, line) && line != "data") {
        std::istringstream l(line);
        std::string word;
        l >> word;
        if (word == "buffer") {
            size_t n;
            l >> n;
            lens.push_back(n);
        } else if (word == "reloc") {
            Reloc r;
            l >> r.buf >> r.pos >> r.target >> r.offset;
            relocs.push_back(r);
        } else if (word == "launch") {
            Launch la;
            l >> la.name >> la.grid.x >> la.grid.y >> la.grid.z >> la.block.x >> la.block.y >>
                la.block.z;
            if (!table.count(la.name)) emu::fail("no kernel " + la.name);
            launches.push_back(la);
        } else if (word == "arg") {
            if (launches.empty()) emu::fail("an argument before any launch");
            emu::Arg a;
            l >> a.kind;
            if (a.kind == "buf") {
                l >> a.a >> a.b;
            } else if (a.kind == "f32") {
                l >> std::hex >> a.a;
            } else if (a.kind == "i32") {
                long long v = 0;
                l >> v;
                int32_t i = (int32_t)v;
                std::memcpy(&a.a, &i, 4);
            } else {
                l >> a.a;
            }
            launches.back().args.push_back(a);
        } else {
            emu::fail("unknown request line: " + line);
        }
        if (l.fail()) emu::fail("malformed request line: " + line);
    }
    for (size_t n : lens) {
        emu::Buffer b = emu::allocate(n);
        in.read(b.data, (std::streamsize)n);
        if ((size_t)in.gcount() != n) emu::fail("the request's data is shorter than its buffers");
        emu::buffers.push_back(b);
    }
    for (const Reloc& r : relocs) {
        if (r.buf >= lens.size() || r.target >= lens.size() || r.pos + 8 > lens[r.buf] ||
            r.offset > lens[r.target])
            emu::fail("relocation outside the buffers");
        uint64_t addr = (uint64_t)(uintptr_t)(emu::buffers[r.target].data + r.offset);
        std::memcpy(emu::buffers[r.buf].data + r.pos, &addr, 8);
    }
    signal(SIGSEGV, on_fault);
    signal(SIGBUS, on_fault);
    for (const Launch& la : launches) {
        emu::kernel_name = la.name;
        table.at(la.name)(la.grid, la.block, la.args);
        for (size_t i = 0; i < emu::buffers.size(); i++)
            if (!emu::canaries_intact(emu::buffers[i]))
                emu::fail(la.name + " wrote outside buffer " + std::to_string(i));
    }
    std::ofstream out(argv[2], std::ios::binary);
    for (const emu::Buffer& b : emu::buffers) out.write(b.data, (std::streamsize)b.len);
    if (!out) emu::fail(std::string("cannot write ") + argv[2]);
    return 0;
}
