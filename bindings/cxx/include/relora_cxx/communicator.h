// The communicator a C++ host hands to relora for data-parallel training: implement it with the
// host's own process group (its NCCL, Gloo or MPI wrapper). relora calls all_reduce_sum once per
// bucket of gradients in the same order on every rank, then divides by world_size(); an
// exception thrown here fails the step (nothing applied), and the trainer stays usable.
#pragma once

#include <cstddef>

#include "rust/cxx.h"

namespace relora {
namespace bridge {

class Communicator {
public:
    virtual ~Communicator() = default;
    // Sums `values` elementwise over all ranks, in place.
    virtual void all_reduce_sum(rust::Slice<float> values) = 0;
    // How many ranks take part.
    virtual std::size_t world_size() const = 0;
};

}  // namespace bridge
}  // namespace relora
