// What the CPU ops check beyond the contract's shapes and dtypes (../recurrence_checks.h), and the dtype dispatch
// that follows the checks.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

// The one dtype dispatch of the CPU backend: float32 and float64, with the state kept in the same dtype.
#define DISPATCH_FLOAT_AND_DOUBLE(TYPE, NAME, ...)                                                      \
  [&] {                                                                                                 \
    switch (TYPE) {                                                                                     \
      case at::ScalarType::Float: {                                                                     \
        using scalar_t = float;                                                                         \
        return __VA_ARGS__();                                                                           \
      }                                                                                                 \
      case at::ScalarType::Double: {                                                                    \
        using scalar_t = double;                                                                        \
        return __VA_ARGS__();                                                                           \
      }                                                                                                 \
      default:                                                                                          \
        TORCH_CHECK(false, NAME ": the CPU backend supports float32 and float64, got ", TYPE);         \
    }                                                                                                   \
  }()

namespace rnn_fast::cpu {

void check_supported_dtype(at::ScalarType dtype);

// The kernels trust lengths to lie in [1, T]; on the CPU they can be read without a device sync.
void check_length_values(const std::optional<at::Tensor>& lengths, int64_t seq_len);

const int64_t* lengths_data(const std::optional<at::Tensor>& lengths);

// The packed layout's sizes: D directions, N rows per direction, B = batch_sizes[0], H hidden units, T steps.
struct PackedSizes {
  int64_t D, N, B, H, T;
};

// batch_sizes is PackedSequence's: a CPU int64 [T], each in [1, B], non-increasing. `steps` is a CPU float32 or
// float64 [D, N, W] with N = sum(batch_sizes) and W = width_per_hidden * H.
PackedSizes check_packed_steps(const at::Tensor& steps, const char* name, int64_t width_per_hidden,
                               const at::Tensor& batch_sizes);

PackedSizes check_packed_forward_inputs(const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0,
                                        const at::Tensor& c0, const at::Tensor& batch_sizes);

}  // namespace rnn_fast::cpu
