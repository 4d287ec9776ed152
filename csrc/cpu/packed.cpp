// The packed layout's ops: the recurrence over PackedSequence data [D, N, *] with its batch_sizes (the steps of
// recurrence.h), and the packed layout's grad_w_hh (rnn_fast::cpu_packed_recurrent_weight_grad).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../recurrence_checks.h"
#include "blas.h"
#include "checks.h"
#include "ops.h"
#include "recurrence.h"
#include "step_layout.h"

namespace rnn_fast::cpu {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_packed_recurrence_forward_cpu(
    const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& batch_sizes) {
  const PackedSizes sizes = check_packed_forward_inputs(xw, w_hh, h0, c0, batch_sizes);
  std::vector<int64_t> lengths;
  return forward_outputs(packed_layout(sizes.D, batch_sizes, lengths), xw, w_hh, h0, c0, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_packed_recurrence_inference_cpu(
    const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& batch_sizes) {
  const PackedSizes sizes = check_packed_forward_inputs(xw, w_hh, h0, c0, batch_sizes);
  std::vector<int64_t> lengths;
  auto [y, h_n, c_n, gates, cell] =
      forward_outputs(packed_layout(sizes.D, batch_sizes, lengths), xw, w_hh, h0, c0, false);
  return {y, h_n, c_n};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_packed_recurrence_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& w_hh,
    const at::Tensor& c0, const at::Tensor& gates, const at::Tensor& cell, const at::Tensor& batch_sizes) {
  const PackedSizes sizes = check_packed_steps(gates, "gates", 4, batch_sizes);
  const auto [D, N, B, H, T] = sizes;
  const at::ScalarType dtype = grad_y.scalar_type();
  check_supported_dtype(dtype);
  const at::Device device = gates.device();
  RNN_FAST_CHECK_INPUT(grad_y, device, dtype, D, N, H);
  RNN_FAST_CHECK_INPUT(grad_h_n, device, dtype, D, B, H);
  RNN_FAST_CHECK_INPUT(grad_c_n, device, dtype, D, B, H);
  RNN_FAST_CHECK_INPUT(w_hh, device, rnn_fast::weight_dtype(dtype, w_hh, true), D, 4 * H, H);
  RNN_FAST_CHECK_INPUT(c0, device, dtype, D, B, H);
  RNN_FAST_CHECK_INPUT(gates, device, rnn_fast::state_type(dtype), D, N, 4 * H);
  RNN_FAST_CHECK_INPUT(cell, device, rnn_fast::state_type(dtype), D, N, H);
  std::vector<int64_t> lengths;
  return backward_outputs(packed_layout(D, batch_sizes, lengths), grad_y, grad_h_n, grad_c_n, w_hh, c0, gates,
                          cell);
}

// grad_w_hh[d] = sum over the rows that run of grad_xw^T @ h_prev, in the packed layout. h_prev of direction 0
// at step t is y at t-1 (h0 at t = 0); of direction 1 it is y at t+1 for the rows still running there, else
// h0[1]. The terms are GEMMs over runs of rows; runs that lie one after the other in both operands merge (one
// GEMM for equal lengths), and the threads split the rows, each summing into its own partial.

namespace {

// grad_xw rows [grad_row, +rows) of a direction against h_prev rows [prev_row, +rows) of y, or of h0.
struct WeightGradTerm {
  int64_t direction, grad_row, prev_row, rows;
  bool from_h0;
};

std::vector<WeightGradTerm> weight_grad_terms(const StepLayout& layout, const int64_t* batch) {
  std::vector<WeightGradTerm> terms;
  auto add = [&](WeightGradTerm term) {
    if (term.rows == 0) {
      return;
    }
    if (!terms.empty()) {
      WeightGradTerm& last = terms.back();
      if (last.direction == term.direction && last.from_h0 == term.from_h0 &&
          last.grad_row + last.rows == term.grad_row && last.prev_row + last.rows == term.prev_row) {
        last.rows += term.rows;
        return;
      }
    }
    terms.push_back(term);
  };
  const int64_t T = layout.T, B = layout.B;
  add({0, layout.first_row(0, 0), 0, batch[0], true});
  for (int64_t t = 1; t < T; ++t) {
    add({0, layout.first_row(0, t), layout.first_row(0, t - 1), batch[t], false});
  }
  for (int64_t d = 1; d < layout.D; ++d) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t still_running = t + 1 < T ? batch[t + 1] : 0;
      add({d, layout.first_row(d, t), t + 1 < T ? layout.first_row(d, t + 1) : 0, still_running, false});
      add({d, layout.first_row(d, t) + still_running, d * B + still_running, batch[t] - still_running, true});
    }
  }
  return terms;
}

template <typename scalar_t>
void accumulate_weight_grad_terms(const std::vector<WeightGradTerm>& terms, int64_t total_rows, int64_t team,
                                  int64_t D, int64_t H, const scalar_t* grad_xw, const scalar_t* y,
                                  const scalar_t* h0, scalar_t* partials) {
  const int64_t G = 4 * H;
#pragma omp parallel for num_threads(team) schedule(static, 1) if (team > 1)
  for (int64_t k = 0; k < team; ++k) {
    // This thread's share of the rows of all terms, laid end to end.
    const int64_t share_begin = total_rows / team * k + total_rows % team * k / team;
    const int64_t share_end = total_rows / team * (k + 1) + total_rows % team * (k + 1) / team;
    int64_t offset = 0;
    for (const WeightGradTerm& term : terms) {
      const int64_t begin = std::max(share_begin, offset), end = std::min(share_end, offset + term.rows);
      if (begin < end) {
        const int64_t skip = begin - offset;
        const scalar_t* prev = (term.from_h0 ? h0 : y) + (term.prev_row + skip) * H;
        // Row-major out[G, H] += grad^T [G, rows] @ prev [rows, H], as column-major out^T = prev^T @ grad.
        blas_gemm("N", "T", static_cast<int>(H), static_cast<int>(G), static_cast<int>(end - begin), prev,
                  static_cast<int>(H), grad_xw + (term.grad_row + skip) * G, static_cast<int>(G), scalar_t(1),
                  partials + (k * D + term.direction) * G * H, static_cast<int>(H));
      }
      offset += term.rows;
    }
  }
}

}  // namespace

at::Tensor packed_recurrent_weight_grad_cpu(const at::Tensor& grad_xw, const at::Tensor& y, const at::Tensor& h0,
                                            const at::Tensor& batch_sizes) {
  const PackedSizes sizes = check_packed_steps(grad_xw, "grad_xw", 4, batch_sizes);
  const auto [D, N, B, H, T] = sizes;
  const at::ScalarType dtype = grad_xw.scalar_type();
  RNN_FAST_CHECK_INPUT(grad_xw, grad_xw.device(), dtype, D, N, 4 * H);
  RNN_FAST_CHECK_INPUT(y, grad_xw.device(), dtype, D, N, H);
  RNN_FAST_CHECK_INPUT(h0, grad_xw.device(), dtype, D, B, H);
  std::vector<int64_t> lengths;
  const auto terms = weight_grad_terms(packed_layout(D, batch_sizes, lengths), batch_sizes.data_ptr<int64_t>());
  const int64_t total_rows = D * N;
  // Each thread takes at least a few GEMM-worthy rows.
  const int64_t team = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total_rows / 64));
  auto partials = at::zeros({team, D, 4 * H, H}, grad_xw.options());
  const SequentialBlas sequential;
  DISPATCH_FLOAT_AND_DOUBLE(dtype, "packed_recurrent_weight_grad", [&] {
    accumulate_weight_grad_terms(terms, total_rows, team, D, H, grad_xw.data_ptr<scalar_t>(),
                                 y.data_ptr<scalar_t>(), h0.data_ptr<scalar_t>(), partials.data_ptr<scalar_t>());
  });
  return team == 1 ? partials[0] : partials.sum(0);
}

}  // namespace rnn_fast::cpu
