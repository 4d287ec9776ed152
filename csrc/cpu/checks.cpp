// The CPU ops' own checks (checks.h).
#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "../recurrence_checks.h"
#include "checks.h"

namespace rnn_fast::cpu {

void check_supported_dtype(at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "the CPU backend supports float32 and float64, got ",
              dtype);
}

void check_length_values(const std::optional<at::Tensor>& lengths, int64_t seq_len) {
  if (!lengths.has_value()) {
    return;
  }
  const int64_t* data = lengths->data_ptr<int64_t>();
  for (int64_t b = 0; b < lengths->numel(); ++b) {
    TORCH_CHECK(data[b] >= 1 && data[b] <= seq_len, "lengths must lie in [1, T] = [1, ", seq_len,
                "], got lengths[", b, "] = ", data[b]);
  }
}

const int64_t* lengths_data(const std::optional<at::Tensor>& lengths) {
  return lengths.has_value() ? lengths->data_ptr<int64_t>() : nullptr;
}

PackedSizes check_packed_steps(const at::Tensor& steps, const char* name, int64_t width_per_hidden,
                               const at::Tensor& batch_sizes) {
  check_supported_dtype(steps.scalar_type());
  TORCH_CHECK(steps.device().is_cpu(), name, " must be a CPU tensor, got one on ", steps.device());
  TORCH_CHECK(steps.dim() == 3, name, " must have shape (D, N, ", width_per_hidden == 4 ? "4H" : "H", "), got ",
              steps.sizes());
  TORCH_CHECK(batch_sizes.dim() == 1 && batch_sizes.numel() >= 1,
              "batch_sizes must have shape (T) with T >= 1, got ", batch_sizes.sizes());
  TORCH_CHECK(batch_sizes.device().is_cpu() && batch_sizes.scalar_type() == at::kLong,
              "batch_sizes must be a CPU int64 tensor (PackedSequence's), got ", batch_sizes.scalar_type(), " on ",
              batch_sizes.device());
  TORCH_CHECK(batch_sizes.is_contiguous(), "batch_sizes must be contiguous");
  const int64_t D = steps.size(0), N = steps.size(1), W = steps.size(2), T = batch_sizes.numel();
  TORCH_CHECK(D == 1 || D == 2, "the number of directions (dimension 0 of ", name, ") must be 1 or 2, got ", D);
  TORCH_CHECK(W % width_per_hidden == 0 && W > 0, "the last dimension of ", name, " must be ", width_per_hidden,
              " * hidden_size, got ", W);
  const int64_t* sizes = batch_sizes.data_ptr<int64_t>();
  int64_t tokens = 0;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(sizes[t] >= 1 && sizes[t] <= sizes[0] && (t == 0 || sizes[t] <= sizes[t - 1]),
                "batch_sizes must be positive and non-increasing, got batch_sizes[", t, "] = ", sizes[t]);
    tokens += sizes[t];
  }
  TORCH_CHECK(N == tokens, "dimension 1 of ", name, " must be sum(batch_sizes) = ", tokens, ", got ", N);
  constexpr int64_t kMaxSize = std::numeric_limits<int>::max();
  TORCH_CHECK(D * N <= kMaxSize && W <= kMaxSize, "the sizes of ", name, " must fit in int32, got ", steps.sizes());
  return {D, N, sizes[0], W / width_per_hidden, T};
}

PackedSizes check_packed_forward_inputs(const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0,
                                        const at::Tensor& c0, const at::Tensor& batch_sizes) {
  const PackedSizes sizes = check_packed_steps(xw, "xw", 4, batch_sizes);
  const auto [D, N, B, H, T] = sizes;
  const at::ScalarType dtype = xw.scalar_type();
  RNN_FAST_CHECK_INPUT(xw, xw.device(), dtype, D, N, 4 * H);
  RNN_FAST_CHECK_INPUT(w_hh, xw.device(), rnn_fast::weight_dtype(dtype, w_hh, true), D, 4 * H, H);
  RNN_FAST_CHECK_INPUT(h0, xw.device(), dtype, D, B, H);
  RNN_FAST_CHECK_INPUT(c0, xw.device(), dtype, D, B, H);
  return sizes;
}

}  // namespace rnn_fast::cpu
