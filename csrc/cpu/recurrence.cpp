// The fused CPU recurrence of the LSTM contract (docs/contract.md), float32 and float64: the elementwise passes,
// the forward and the backward over either step layout, and the ops of the padded layout [D, T, B, *] (training
// forward and backward, and an inference forward that keeps no gates or cells).
//
// Batch rows never interact in an LSTM, so each OpenMP thread owns one (direction, block of rows) for all T
// steps and never waits for another thread. A step computes only the rows that run it (t < lengths[b]).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../recurrence_checks.h"
#include "activations.h"
#include "checks.h"
#include "ops.h"
#include "output_cache.h"
#include "recurrence.h"

namespace rnn_fast::cpu {

namespace {

// kSave: keep the activated gates and the cell for the backward (training); inference keeps neither.
template <bool kSave, typename scalar_t>
RNN_FAST_INLINE void forward_cells(const ForwardStep<scalar_t>& s) {
  const int64_t H = s.hidden, G = 4 * H;
  for (int64_t r = 0; r < s.rows; ++r) {
    scalar_t* gates = s.gates + r * G;
    scalar_t* cell = s.cell + r * H;
    scalar_t* y = s.y + r * s.y_stride;
    scalar_t* h = s.h + r * H;
    scalar_t* c = s.c + r * H;
#pragma omp simd
    for (int64_t j = 0; j < s.units; ++j) {
      const scalar_t i = sigmoid_activation(gates[j]);
      const scalar_t f = sigmoid_activation(gates[H + j]);
      const scalar_t g = tanh_activation(gates[2 * H + j]);
      const scalar_t o = sigmoid_activation(gates[3 * H + j]);
      const scalar_t c_next = f * c[j] + i * g;
      const scalar_t h_next = o * tanh_activation(c_next);
      if constexpr (kSave) {
        gates[j] = i;
        gates[H + j] = f;
        gates[2 * H + j] = g;
        gates[3 * H + j] = o;
        cell[j] = c_next;
      }
      c[j] = c_next;
      y[j] = h_next;
      h[j] = h_next;
    }
  }
}

// Units [0, units) of a row from each pointer, which the caller offsets to the item's first unit (ForwardStep).
template <typename scalar_t>
struct BackwardStep {
  const scalar_t* grad_y;     // [rows, H]
  const scalar_t* gates;      // [rows, 4H]
  const scalar_t* cell;       // [rows, H]
  const scalar_t* cell_prev;  // [rows, H]: cell at the previous processed step (nullptr at the first step)
  const scalar_t* c0;         // [rows, H]: cell_prev at each row's first step
  scalar_t* grad_pre;         // [rows, 4H]
  scalar_t* dh;               // [rows, H] running dL/dh: read, then zeroed for the GEMM to accumulate into
  scalar_t* dc;               // [rows, H] running dL/dc, updated in place
  const int64_t* lengths;
  int64_t step, first_step, rows, hidden;  // first_step: the direction's first step (0 or T-1)
  bool reverse;
  int64_t units;
};

template <typename scalar_t>
RNN_FAST_INLINE void backward_cells(const BackwardStep<scalar_t>& s) {
  const int64_t H = s.hidden, G = 4 * H;
  for (int64_t r = 0; r < s.rows; ++r) {
    // The reverse direction starts each row at its own last step.
    const int64_t row_first_step = s.reverse && s.lengths != nullptr ? s.lengths[r] - 1 : s.first_step;
    const scalar_t* cell_prev = (s.step == row_first_step ? s.c0 : s.cell_prev) + r * H;
    const scalar_t* gates = s.gates + r * G;
    const scalar_t* cell = s.cell + r * H;
    const scalar_t* grad_y = s.grad_y + r * H;
    scalar_t* grad_pre = s.grad_pre + r * G;
    scalar_t* dh = s.dh + r * H;
    scalar_t* dc = s.dc + r * H;
#pragma omp simd
    for (int64_t j = 0; j < s.units; ++j) {
      const scalar_t i = gates[j], f = gates[H + j], g = gates[2 * H + j], o = gates[3 * H + j];
      const scalar_t tanh_c = tanh_activation(cell[j]);
      const scalar_t dh_t = grad_y[j] + dh[j];
      const scalar_t dc_t = dc[j] + dh_t * o * (scalar_t(1) - tanh_c * tanh_c);
      grad_pre[j] = dc_t * g * i * (scalar_t(1) - i);
      grad_pre[H + j] = dc_t * cell_prev[j] * f * (scalar_t(1) - f);
      grad_pre[2 * H + j] = dc_t * i * (scalar_t(1) - g * g);
      grad_pre[3 * H + j] = dh_t * tanh_c * o * (scalar_t(1) - o);
      dc[j] = dc_t * f;
      dh[j] = scalar_t(0);
    }
  }
}

}  // namespace

RNN_FAST_TARGET_CLONES void forward_cells_vectorised(const ForwardStep<float>& s) { forward_cells<true>(s); }
RNN_FAST_TARGET_CLONES void forward_cells_vectorised(const ForwardStep<double>& s) { forward_cells<true>(s); }
RNN_FAST_TARGET_CLONES void inference_cells_vectorised(const ForwardStep<float>& s) { forward_cells<false>(s); }
RNN_FAST_TARGET_CLONES void inference_cells_vectorised(const ForwardStep<double>& s) { forward_cells<false>(s); }
RNN_FAST_TARGET_CLONES void backward_cells_vectorised(const BackwardStep<float>& s) { backward_cells(s); }
RNN_FAST_TARGET_CLONES void backward_cells_vectorised(const BackwardStep<double>& s) { backward_cells(s); }

namespace {

template <typename scalar_t>
void run_forward(const StepLayout& layout, int64_t H, const ForwardTensors<scalar_t>& out,
                 const std::vector<WorkItem>& items) {
  const int64_t G = 4 * H;
  for_each_work_item(items, [&](const WorkItem& item) {
    const auto accumulate_gates = recurrent_gemms(out.w_hh[item.direction], item, H, layout.T);
    scalar_t* scratch = out.gates != nullptr ? nullptr
                                             : thread_scratch<scalar_t>(std::min(kRowsPerSubBlock, item.rows()) * G);
    forward_steps(layout, H, out, item, accumulate_gates, scratch, 0, layout.T);
    settle_state(layout, H, out, item, layout.T);
  });
}

template <typename scalar_t>
struct BackwardTensors {
  const scalar_t* grad_y;
  Weights<scalar_t> w_hh;  // [D, 4H, H]
  const scalar_t* c0;
  const scalar_t* gates;
  const scalar_t* cell;
  scalar_t* grad_xw;
  scalar_t* dh;  // [D, B, H] running dL/dh, grad_h_n in, grad_h0 out
  scalar_t* dc;  // [D, B, H] running dL/dc, grad_c_n in, grad_c0 out
};

// The backward of one work item. Per step: the elementwise pass over its units of every row that runs, then (after
// the crew's barrier: the GEMM reads every unit's gate gradients) dh[rows, its units] += grad_pre @ w_hh[:, its units].
template <typename scalar_t>
void run_backward(const StepLayout& layout, int64_t H, const BackwardTensors<scalar_t>& out) {
  const int64_t T = layout.T, B = layout.B, G = 4 * H;
  for_each_work_item(plan_work(layout, H), [&](const WorkItem& item) {
    const int64_t d = item.direction, j0 = item.unit_begin;
    const StepGemm<scalar_t> accumulate_hidden_grad(out.w_hh + (d * G * H + j0), item.units(), G, H, false, T,
                                                    std::min(kRowsPerSubBlock, item.rows()), 0, item.gemm);
    const GateColumns columns(item, H);
    const int64_t first_step = d == 0 ? 0 : T - 1;
    // Steps in reverse processing order: direction 0 goes t = T-1 .. 0, direction 1 goes t = 0 .. T-1.
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = d == 0 ? T - 1 - s : s;
      const int64_t step_row = layout.first_row(d, t);
      // The previous processed step in the forward pass; a row that runs t ran it too, unless t is the row's
      // first step (backward_cells then reads c0).
      const int64_t prev_row = t == first_step ? -1 : layout.first_row(d, d == 0 ? t - 1 : t + 1);
      for_each_run(layout, t, item.begin, item.end, [&](int64_t b, int64_t end, bool runs) {
        const int64_t rows = end - b, row = step_row + b, state_row = d * B + b;
        if (!runs) {
          // The state passes through a padded step untouched.
          if (layout.padded) {
            columns.fill(out.grad_xw + row * G, rows, G, scalar_t(0));
          }
          return;
        }
        backward_cells_vectorised(BackwardStep<scalar_t>{
            out.grad_y + row * H + j0, out.gates + row * G + j0, out.cell + row * H + j0,
            prev_row < 0 ? nullptr : out.cell + (prev_row + b) * H + j0, out.c0 + state_row * H + j0,
            out.grad_xw + row * G + j0, out.dh + state_row * H + j0, out.dc + state_row * H + j0,
            layout.lengths == nullptr ? nullptr : layout.lengths + b, t, first_step, rows, H, d == 1, item.units()});
      });
      crew_barrier(item);
      for_each_run(layout, t, item.begin, item.end, [&](int64_t b, int64_t end, bool runs) {
        if (runs) {
          accumulate_hidden_grad(out.grad_xw + (step_row + b) * G, G, out.dh + (d * B + b) * H + j0, H, end - b);
        }
      });
    }
  });
}

StepLayout checked_padded_layout(const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0,
                                 const at::Tensor& c0, const std::optional<at::Tensor>& lengths) {
  check_supported_dtype(xw.scalar_type());
  const auto sizes = rnn_fast::check_forward_inputs(xw, w_hh, h0, c0, lengths, true);
  check_length_values(lengths, sizes.T);
  return padded_layout(sizes.D, sizes.T, sizes.B, lengths_data(lengths));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_outputs(
    const StepLayout& layout, const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0,
    const at::Tensor& c0, bool save) {
  const int64_t G = xw.size(-1), H = G / 4;
  std::vector<int64_t> row_shape(xw.sizes().begin(), xw.sizes().end());
  row_shape.back() = H;
  auto y = empty_output(row_shape, xw.options());
  at::Tensor gates, cell;
  if (save) {
    gates = empty_output(xw.sizes(), xw.options());
    cell = empty_output(row_shape, xw.options());
  }
  auto h_n = h0.clone();
  auto c_n = c0.clone();
  const std::vector<WorkItem> items = plan_work(layout, H);
  const at::Tensor h_other = has_crews(items) ? at::empty_like(h0) : at::Tensor();
  DISPATCH_FLOAT_AND_DOUBLE(xw.scalar_type(), "lstm_recurrence_forward", [&] {
    const Weights<scalar_t> w = weights_of<scalar_t>(w_hh);
    ForwardTensors<scalar_t> out{
        xw.data_ptr<scalar_t>(), {w, w + (layout.D - 1) * G * H}, y.data_ptr<scalar_t>(),
        layout.direction_rows * H, H, h_n.data_ptr<scalar_t>(), c_n.data_ptr<scalar_t>(),
        save ? gates.data_ptr<scalar_t>() : nullptr, save ? cell.data_ptr<scalar_t>() : nullptr};
    out.h_other = h_other.defined() ? h_other.data_ptr<scalar_t>() : nullptr;
    run_forward(layout, H, out, items);
  });
  return {y, h_n, c_n, gates, cell};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_outputs(const StepLayout& layout, const at::Tensor& grad_y,
                                                                const at::Tensor& grad_h_n,
                                                                const at::Tensor& grad_c_n, const at::Tensor& w_hh,
                                                                const at::Tensor& c0, const at::Tensor& gates,
                                                                const at::Tensor& cell) {
  auto grad_xw = empty_output(gates.sizes(), gates.options());
  // The gradients at the initial state are the running dh/dc, updated in place step after step.
  auto grad_h0 = grad_h_n.clone();
  auto grad_c0 = grad_c_n.clone();
  DISPATCH_FLOAT_AND_DOUBLE(grad_y.scalar_type(), "lstm_recurrence_backward", [&] {
    run_backward(layout, w_hh.size(2), BackwardTensors<scalar_t>{
        grad_y.data_ptr<scalar_t>(), weights_of<scalar_t>(w_hh), c0.data_ptr<scalar_t>(),
        gates.data_ptr<scalar_t>(), cell.data_ptr<scalar_t>(), grad_xw.data_ptr<scalar_t>(),
        grad_h0.data_ptr<scalar_t>(), grad_c0.data_ptr<scalar_t>()});
  });
  return {grad_xw, grad_h0, grad_c0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_recurrence_forward_cpu(
    const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
    const std::optional<at::Tensor>& lengths) {
  return forward_outputs(checked_padded_layout(xw, w_hh, h0, c0, lengths), xw, w_hh, h0, c0, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_recurrence_inference_cpu(
    const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
    const std::optional<at::Tensor>& lengths) {
  auto [y, h_n, c_n, gates, cell] =
      forward_outputs(checked_padded_layout(xw, w_hh, h0, c0, lengths), xw, w_hh, h0, c0, false);
  return {y, h_n, c_n};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_recurrence_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& w_hh,
    const at::Tensor& c0, const at::Tensor& gates, const at::Tensor& cell, const std::optional<at::Tensor>& lengths) {
  check_supported_dtype(grad_y.scalar_type());
  const auto sizes = rnn_fast::check_backward_inputs(grad_y, grad_h_n, grad_c_n, w_hh, c0, gates, cell, lengths,
                                                     true);
  check_length_values(lengths, sizes.T);
  return backward_outputs(padded_layout(sizes.D, sizes.T, sizes.B, lengths_data(lengths)), grad_y, grad_h_n,
                          grad_c_n, w_hh, c0, gates, cell);
}

}  // namespace rnn_fast::cpu
