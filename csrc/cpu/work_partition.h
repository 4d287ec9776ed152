// Work partition: each thread owns (direction, block of rows) pairs for all T steps and never waits for another.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "blas.h"
#include "step_layout.h"

namespace rnn_fast::cpu {

struct RowBlock {
  int64_t direction, begin, end;
};

// About threads / D contiguous blocks of rows per direction, each with about the same number of row-steps to
// run. Equal numbers of rows would not do: in packed order the rows are sorted by length, and the thread of the
// short rows would sit idle once they end.
std::vector<RowBlock> row_blocks(const StepLayout& layout, int64_t threads);

// Runs body(RowBlock) for every block, each on one thread; without an OpenMP region when one thread does all.
template <typename Body>
void for_each_row_block(const StepLayout& layout, const Body& body) {
  const int64_t threads = at::get_num_threads();
  const std::vector<RowBlock> blocks = row_blocks(layout, threads);
  const int64_t num_blocks = static_cast<int64_t>(blocks.size());
  const int64_t team = std::min(threads, num_blocks);
  if (team <= 1) {
    const SequentialBlas sequential;
    for (const RowBlock& block : blocks) {
      body(block);
    }
    return;
  }
#pragma omp parallel for num_threads(team) schedule(static, 1)
  for (int64_t index = 0; index < num_blocks; ++index) {
    body(blocks[index]);
  }
}

// Per-thread buffers of at least `count` elements, kept across calls: slot 0 for the inference pass's
// pre-activations, slot 1 for the chunks of xw the whole-stack inference projects.
template <typename scalar_t>
scalar_t* thread_scratch(size_t count, int slot = 0) {
  thread_local std::array<std::vector<scalar_t>, 2> buffers;
  std::vector<scalar_t>& buffer = buffers[slot];
  if (buffer.size() < count) {
    buffer.resize(count);
  }
  return buffer.data();
}

}  // namespace rnn_fast::cpu
