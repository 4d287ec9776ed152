// The cpu backend's input projection ops: rnn_fast::cpu_input_projection and its backward (input_projection.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../recurrence_checks.h"
#include "bf16_gemm.h"
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
  if (dtype != at::kBFloat16) {
    check_supported_dtype(dtype);
  }
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

namespace {

// The projection of bf16 parts and w_ih into fp32 xw (bf16_gemm.h), with an fp32 bias. The rows are cut into blocks
// of kRowsPerSubBlock, whose outputs stay in cache while the parts add onto them; each thread takes a run of blocks
// and reorders each direction's and part's weights once for them.
at::Tensor bf16_input_projection(const at::Tensor& parts, const at::Tensor& w_ih, const float* bias) {
  const int64_t P = parts.size(0), T = parts.size(1), B = parts.size(2), K = parts.size(3);
  const int64_t D = w_ih.size(0), G = w_ih.size(1);
  auto xw = empty_output({D, T, B, G}, parts.options().dtype(at::kFloat));
  const PartsView<c10::BFloat16> view = parts_view<c10::BFloat16>(parts);
  const c10::BFloat16* w = w_ih.data_ptr<c10::BFloat16>();
  float* out = xw.data_ptr<float>();
  std::vector<ProjectionBlock> tasks;
  for (const ProjectionBlock& block : projection_blocks(view, G)) {
    for (int64_t first = 0; first < block.rows; first += kRowsPerSubBlock) {
      tasks.push_back({block.input + first * block.input_ld, block.input_ld, block.output + first * block.output_ld,
                       block.output_ld, std::min(kRowsPerSubBlock, block.rows - first)});
    }
  }
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), num_tasks);
  at::parallel_for(0, threads, 1, [&](int64_t first_thread, int64_t end_thread) {
    for (int64_t thread = first_thread; thread < end_thread; ++thread) {
      const int64_t begin = num_tasks * thread / threads, end = num_tasks * (thread + 1) / threads;
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t p = 0; p < P; ++p) {
          const Bf16StepWeights weights(w + d * G * P * K + p * K, G, K, P * K, true, 0);
          for (int64_t task = begin; task < end; ++task) {
            const ProjectionBlock& block = tasks[task];
            float* rows = out + d * T * B * G + block.output;
            if (p == 0) {
              for (int64_t row = 0; row < block.rows; ++row) {
                if (bias == nullptr) {
                  std::fill(rows + row * block.output_ld, rows + row * block.output_ld + G, 0.0f);
                } else {
                  std::copy(bias + d * G, bias + (d + 1) * G, rows + row * block.output_ld);
                }
              }
            }
            weights(view.data + p * view.part_stride + block.input, block.input_ld, rows, block.output_ld,
                    block.rows);
          }
        }
      }
    }
  });
  return xw;
}

}  // namespace

at::Tensor input_projection_cpu(const at::Tensor& parts, const at::Tensor& w_ih, const std::optional<at::Tensor>& bias) {
  check_projection(parts, w_ih);
  const int64_t P = parts.size(0), T = parts.size(1), B = parts.size(2), K = parts.size(3);
  const int64_t D = w_ih.size(0), G = w_ih.size(1);
  const bool bf16_products = parts.scalar_type() == at::kBFloat16;
  if (bias.has_value()) {
    RNN_FAST_CHECK_INPUT((*bias), parts.device(), bf16_products ? at::kFloat : parts.scalar_type(), D, G);
  }
  check_projection_sizes(parts, G);
  if (bf16_products) {
    return bf16_input_projection(parts, w_ih, bias.has_value() ? bias->data_ptr<float>() : nullptr);
  }
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
