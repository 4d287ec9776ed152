// Outputs. Fresh memory costs a page fault and the kernel zeroing each page at first touch; for the
// [D, T, B, 4H] gates and grad_xw of the classifier that costs about as much as the recurrence's GEMMs.
// Training repeats the same shapes every iteration, so the large outputs come from a cache of blocks that
// outlives them: a block freed with one iteration's tensors is taken again, already mapped, by the next.
// Blocks match by exact size. At most kMaxCachedBytes sit unused in the cache; beyond that the blocks unused
// for longest (shapes no longer run) go back to the system, as do all unused blocks on request
// (rnn_fast::cpu_release_cached_blocks). New blocks ask for transparent huge pages (one fault per 2 MiB instead
// of per 4 KiB).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace rnn_fast::cpu {

// An uninitialised CPU tensor, as at::empty gives, in a block of the cache when it is large enough to gain.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Gives every unused block back to the system (rnn_fast::cpu_release_cached_blocks); returns how many bytes that was.
int64_t release_cached_blocks();

}  // namespace rnn_fast::cpu
