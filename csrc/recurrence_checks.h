// Op-boundary checks of the recurrence contract (docs/contract.md), shared by the CPU and CUDA backends. They
// run before anything is allocated or launched, and each names the offending argument and the contract's shape.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <optional>

// `x` on `device`, of `dtype`, of the shape given by the remaining arguments (quoted as written, so messages read
// "h0 must have shape (D, B, H) = [2, 7, 5], got ...") and dense.
#define RNN_FAST_CHECK_INPUT(x, expected_device, expected_dtype, ...)                                       \
  TORCH_CHECK((x).device() == (expected_device), #x " must be on ", (expected_device), " like the other inputs, got ", \
              (x).device());                                                                                    \
  TORCH_CHECK((x).scalar_type() == (expected_dtype), #x " must have dtype ", (expected_dtype), ", got ",        \
              (x).scalar_type());                                                                               \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ ") = ",      \
              at::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes());                                           \
  TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")

namespace rnn_fast {

// The contract's sizes: D directions, T steps, B batch rows, H hidden units.
struct RecurrenceSizes {
  int64_t D, T, B, H;
};

// Saved gates and cells are kept in at least fp32, as rnn_fast.ops.lstm.precision.state_dtype says on the Python side.
inline at::ScalarType state_type(at::ScalarType dtype) {
  return dtype == at::ScalarType::Double ? at::ScalarType::Double : at::ScalarType::Float;
}

// The sizes of a [D, T, B, 4H] tensor (the forward's xw, the backward's gates). Kernels index with int32 and BLAS
// takes int dimensions, hence the bound.
inline RecurrenceSizes step_tensor_sizes(const at::Tensor& steps, const char* name) {
  TORCH_CHECK(steps.dim() == 4, name, " must have shape (D, T, B, 4H), got ", steps.sizes());
  const int64_t D = steps.size(0), T = steps.size(1), B = steps.size(2), G = steps.size(3);
  TORCH_CHECK(D == 1 || D == 2, "the number of directions (dimension 0 of ", name, ") must be 1 or 2, got ", D);
  TORCH_CHECK(G % 4 == 0 && G > 0, "the gate dimension of ", name, " must be 4 * hidden_size, got ", G);
  TORCH_CHECK(T >= 1, "the sequence length must be at least 1, got ", T);
  constexpr int64_t kMaxSize = std::numeric_limits<int>::max();
  TORCH_CHECK(T <= kMaxSize && B <= kMaxSize && G <= kMaxSize, "the sizes of ", name, " must fit in int32, got ",
              steps.sizes());
  return {D, T, B, G / 4};
}

inline void check_lengths(const std::optional<at::Tensor>& maybe_lengths, const at::Device& device, int64_t B) {
  if (maybe_lengths.has_value()) {
    const at::Tensor& lengths = *maybe_lengths;
    RNN_FAST_CHECK_INPUT(lengths, device, at::ScalarType::Long, B);
  }
}

// w_hh's dtype: that of the other inputs (`dtype`), or bfloat16 with float32 ones where the backend takes bf16
// weights to multiply in bf16 (`bf16_products`: the CPU backend, docs/contract.md).
inline at::ScalarType weight_dtype(at::ScalarType dtype, const at::Tensor& w_hh, bool bf16_products) {
  return bf16_products && dtype == at::kFloat && w_hh.scalar_type() == at::kBFloat16 ? at::kBFloat16 : dtype;
}

// Everything on xw's device and of xw's dtype, w_hh of weight_dtype's.
inline RecurrenceSizes check_forward_inputs(const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0,
                                            const at::Tensor& c0, const std::optional<at::Tensor>& lengths,
                                            bool bf16_products = false) {
  const RecurrenceSizes sizes = step_tensor_sizes(xw, "xw");
  const auto [D, T, B, H] = sizes;
  const at::Device device = xw.device();
  const at::ScalarType dtype = xw.scalar_type();
  RNN_FAST_CHECK_INPUT(xw, device, dtype, D, T, B, 4 * H);
  RNN_FAST_CHECK_INPUT(w_hh, device, weight_dtype(dtype, w_hh, bf16_products), D, 4 * H, H);
  RNN_FAST_CHECK_INPUT(h0, device, dtype, D, B, H);
  RNN_FAST_CHECK_INPUT(c0, device, dtype, D, B, H);
  check_lengths(lengths, device, B);
  return sizes;
}

// Everything on w_hh's device and of w_hh's dtype (float32 for bf16 products), except the saved gates and cells in
// `saved_dtype`.
inline RecurrenceSizes check_backward_inputs(const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                                             const at::Tensor& grad_c_n, const at::Tensor& w_hh, const at::Tensor& c0,
                                             const at::Tensor& gates, const at::Tensor& cell,
                                             const std::optional<at::Tensor>& lengths, at::ScalarType saved_dtype,
                                             bool bf16_products = false) {
  const RecurrenceSizes sizes = step_tensor_sizes(gates, "gates");
  const auto [D, T, B, H] = sizes;
  const at::Device device = w_hh.device();
  const at::ScalarType dtype =
      bf16_products && w_hh.scalar_type() == at::kBFloat16 ? at::kFloat : w_hh.scalar_type();
  RNN_FAST_CHECK_INPUT(grad_y, device, dtype, D, T, B, H);
  RNN_FAST_CHECK_INPUT(grad_h_n, device, dtype, D, B, H);
  RNN_FAST_CHECK_INPUT(grad_c_n, device, dtype, D, B, H);
  RNN_FAST_CHECK_INPUT(w_hh, device, weight_dtype(dtype, w_hh, bf16_products), D, 4 * H, H);
  RNN_FAST_CHECK_INPUT(c0, device, dtype, D, B, H);
  RNN_FAST_CHECK_INPUT(gates, device, saved_dtype, D, T, B, 4 * H);
  RNN_FAST_CHECK_INPUT(cell, device, saved_dtype, D, T, B, H);
  check_lengths(lengths, device, B);
  return sizes;
}

// The contract's saved state: w_hh's state dtype (the CUDA backend's saved_16bit variant also takes 16 bits).
inline RecurrenceSizes check_backward_inputs(const at::Tensor& grad_y, const at::Tensor& grad_h_n,
                                             const at::Tensor& grad_c_n, const at::Tensor& w_hh, const at::Tensor& c0,
                                             const at::Tensor& gates, const at::Tensor& cell,
                                             const std::optional<at::Tensor>& lengths, bool bf16_products = false) {
  return check_backward_inputs(grad_y, grad_h_n, grad_c_n, w_hh, c0, gates, cell, lengths,
                               state_type(w_hh.scalar_type()), bf16_products);
}

}  // namespace rnn_fast
