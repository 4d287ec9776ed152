// The cpu backend's input projection ops: rnn_fast::cpu_input_projection and its backward (input_projection.h).
#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../recurrence_checks.h"
#include "blas.h"
#include "checks.h"
#include "input_projection.h"
#include "ops.h"
#include "output_cache.h"

namespace rnn_fast::cpu {

namespace {

void check_projection(const at::Tensor& parts, const at::Tensor& w_ih) {
  TORCH_CHECK(parts.dim() == 4, "parts must have shape (P, T, B, K), got ", parts.sizes());
  TORCH_CHECK(w_ih.dim() == 3, "w_ih must have shape (D, 4H, P*K), got ", w_ih.sizes());
  const int64_t P = parts.size(0), K = parts.size(3), D = w_ih.size(0), G = w_ih.size(1);
  TORCH_CHECK(G % 4 == 0, "w_ih must have shape (D, 4H, P*K): 4H rows, got ", G);
  const auto dtype = parts.scalar_type();
  check_supported_dtype(dtype);
  TORCH_CHECK(parts.device().is_cpu(), "parts must be a CPU tensor, got one on ", parts.device());
  // Each step parts[p, t] is a BLAS matrix [B, K]: unit stride along K, rows that do not overlap.
  TORCH_CHECK(parts.stride(3) == 1 && parts.stride(2) >= K,
              "parts must have unit stride in its last dimension and non-overlapping rows, got strides ",
              parts.strides());
  RNN_FAST_CHECK_INPUT(w_ih, parts.device(), dtype, D, G, P * K);
}

// w_ih[d][:, p*K:(p+1)*K]: the columns of w_ih that multiply part p.
at::Tensor part_weight(const at::Tensor& w_ih, int64_t direction, int64_t part, int64_t width) {
  return w_ih[direction].narrow(1, part * width, width);
}

// The [rows, K] matrices that tile a part [T, B, K]: the whole part as [T*B, K] when its steps follow each other
// in memory, else one [B, K] matrix per step. `like` ([T, B, N], contiguous) is split the same way.
std::vector<std::pair<at::Tensor, at::Tensor>> step_matrices(const at::Tensor& part, const at::Tensor& like) {
  const int64_t T = part.size(0), B = part.size(1);
  if (T == 1 || part.stride(0) == B * part.stride(1)) {
    return {{part.as_strided({T * B, part.size(2)}, {part.stride(1), 1}), like.view({T * B, like.size(2)})}};
  }
  std::vector<std::pair<at::Tensor, at::Tensor>> steps;
  steps.reserve(T);
  for (int64_t t = 0; t < T; ++t) {
    steps.emplace_back(part[t], like[t]);
  }
  return steps;
}

template <typename scalar_t>
PartsView<scalar_t> parts_view(const at::Tensor& parts) {
  return {parts.data_ptr<scalar_t>(), parts.size(0),   parts.size(1),  parts.size(2),
          parts.size(3),              parts.stride(0), parts.stride(1), parts.stride(2)};
}

}  // namespace

void check_projection_sizes(const at::Tensor& parts, int64_t G) {
  constexpr int64_t kMaxSize = std::numeric_limits<int>::max();
  const int64_t T = parts.size(1), B = parts.size(2);
  TORCH_CHECK(T * B <= kMaxSize && parts.stride(1) <= kMaxSize && parts.stride(2) <= kMaxSize &&
                  parts.size(0) * parts.size(3) <= kMaxSize && B * G <= kMaxSize,
              "the sizes of parts must fit in int32, got ", parts.sizes(), " with strides ", parts.strides());
}

at::Tensor input_projection_cpu(const at::Tensor& parts, const at::Tensor& w_ih, const std::optional<at::Tensor>& bias) {
  check_projection(parts, w_ih);
  const int64_t P = parts.size(0), T = parts.size(1), B = parts.size(2), K = parts.size(3);
  const int64_t D = w_ih.size(0), G = w_ih.size(1);
  if (bias.has_value()) {
    RNN_FAST_CHECK_INPUT((*bias), parts.device(), parts.scalar_type(), D, G);
  }
  check_projection_sizes(parts, G);
  auto xw = empty_output({D, T, B, G}, parts.options());
  DISPATCH_FLOAT_AND_DOUBLE(parts.scalar_type(), "cpu_input_projection", [&] {
    const scalar_t* w = w_ih.data_ptr<scalar_t>();
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    project_parts(parts_view<scalar_t>(parts), {b, b == nullptr ? nullptr : b + (D - 1) * G}, xw.data_ptr<scalar_t>(),
                  T * B * G, D, GateColumns(0, G / 4, G / 4), true,
                  [&](int64_t d, int64_t p, const scalar_t* in, int64_t in_ld, scalar_t* out, int64_t out_ld,
                      int64_t rows) {
                    blas_gemm("T", "N", static_cast<int>(G), static_cast<int>(rows), static_cast<int>(K),
                              w + d * G * P * K + p * K, static_cast<int>(P * K), in, static_cast<int>(in_ld),
                              scalar_t(1), out, static_cast<int>(out_ld));
                  });
  });
  return xw;
}

// Gradients of parts, w_ih and bias; output_mask says which are wanted, the others come back undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> input_projection_backward_cpu(const at::Tensor& grad_xw,
                                                                             const at::Tensor& parts,
                                                                             const at::Tensor& w_ih,
                                                                             std::array<bool, 3> output_mask) {
  check_projection(parts, w_ih);
  const int64_t P = parts.size(0), T = parts.size(1), B = parts.size(2), K = parts.size(3);
  const int64_t D = w_ih.size(0), G = w_ih.size(1);
  RNN_FAST_CHECK_INPUT(grad_xw, parts.device(), parts.scalar_type(), D, T, B, G);
  at::Tensor grad_parts, grad_w_ih, grad_bias;
  if (output_mask[0]) {
    grad_parts = empty_output({P, T, B, K}, parts.options());
    for (int64_t p = 0; p < P; ++p) {
      auto out = grad_parts[p].view({T * B, K});
      at::mm_out(out, grad_xw[0].view({T * B, G}), part_weight(w_ih, 0, p, K));
      for (int64_t d = 1; d < D; ++d) {
        out.addmm_(grad_xw[d].view({T * B, G}), part_weight(w_ih, d, p, K));
      }
    }
  }
  if (output_mask[1]) {
    grad_w_ih = at::zeros({D, G, P * K}, w_ih.options());
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t p = 0; p < P; ++p) {
        auto grad_weight = grad_w_ih[d].narrow(1, p * K, K);
        for (auto& [input, grad] : step_matrices(parts[p], grad_xw[d])) {
          grad_weight.addmm_(grad.t(), input);
        }
      }
    }
  }
  if (output_mask[2]) {
    grad_bias = grad_xw.sum({1, 2});
  }
  return {grad_parts, grad_w_ih, grad_bias};
}

}  // namespace rnn_fast::cpu
