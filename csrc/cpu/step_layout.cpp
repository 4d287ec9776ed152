// The padded and packed step layouts (step_layout.h).
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "step_layout.h"

namespace rnn_fast::cpu {

StepLayout padded_layout(int64_t D, int64_t T, int64_t B, const int64_t* lengths) {
  StepLayout layout{D, T, B, lengths, true, T * B, std::vector<int64_t>(T + 1)};
  for (int64_t t = 0; t <= T; ++t) {
    layout.step_begin[t] = t * B;
  }
  return layout;
}

StepLayout packed_layout(int64_t D, const at::Tensor& batch_sizes, std::vector<int64_t>& lengths) {
  const int64_t T = batch_sizes.numel(), B = batch_sizes.data_ptr<int64_t>()[0];
  const int64_t* sizes = batch_sizes.data_ptr<int64_t>();
  lengths.assign(B, 0);
  StepLayout layout{D, T, B, lengths.data(), false, 0, std::vector<int64_t>(T + 1)};
  int64_t tokens = 0;
  for (int64_t t = 0; t < T; ++t) {
    layout.step_begin[t] = tokens;
    tokens += sizes[t];
    const int64_t next = t + 1 < T ? sizes[t + 1] : 0;
    for (int64_t b = next; b < sizes[t]; ++b) {
      lengths[b] = t + 1;  // rows [next, sizes[t]) run their last step at t
    }
  }
  layout.step_begin[T] = layout.direction_rows = tokens;
  return layout;
}

}  // namespace rnn_fast::cpu
