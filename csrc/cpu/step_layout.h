// Step layouts. A step tensor holds one row of width W per (direction, step, batch row): padded [D, T, B, W]
// holds every row, padded or not; packed [D, N, W] holds only the N = sum(lengths) rows that run, step after
// step in PackedSequence's data order, whose rows are sorted by length so that the rows running at step t are
// the first batch_sizes[t]. In both, row b of step t of direction d is row first_row(d, t) + b.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "blas.h"  // kRowsPerSubBlock
#include "vectorise.h"

namespace rnn_fast::cpu {

struct StepLayout {
  int64_t D, T, B;
  const int64_t* lengths;  // [B]; nullptr: every row runs every step
  bool padded;             // rows that do not run at a step still exist there, and are written as 0
  int64_t direction_rows;  // rows of one direction: T * B padded, N packed
  std::vector<int64_t> step_begin;  // [T + 1]: the first row of each step within a direction, then direction_rows

  int64_t first_row(int64_t direction, int64_t step) const {
    return direction * direction_rows + step_begin[step];
  }
  bool runs(int64_t row, int64_t step) const { return lengths == nullptr || step < lengths[row]; }
  int64_t row_steps(int64_t row) const { return lengths == nullptr ? T : lengths[row]; }
};

StepLayout padded_layout(int64_t D, int64_t T, int64_t B, const int64_t* lengths);

// `lengths` receives each row's length, which batch_sizes implies.
StepLayout packed_layout(int64_t D, const at::Tensor& batch_sizes, std::vector<int64_t>& lengths);

// Calls body(begin, end, runs) over the rows [begin, end) cut into runs of at most kRowsPerSubBlock rows that all
// run step t (runs == true) or all skip it. With rows sorted by length the rows that run are one prefix.
template <typename Body>
RNN_FAST_INLINE void for_each_run(const StepLayout& layout, int64_t step, int64_t begin, int64_t end,
                                  const Body& body) {
  for (int64_t b = begin; b < end;) {
    const bool runs = layout.runs(b, step);
    const int64_t limit = std::min(end, b + kRowsPerSubBlock);
    int64_t stop = b + 1;
    while (stop < limit && layout.runs(stop, step) == runs) {
      ++stop;
    }
    body(b, stop, runs);
    b = stop;
  }
}

}  // namespace rnn_fast::cpu
