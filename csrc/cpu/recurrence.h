// The recurrence, in either layout. Per step and per run of rows it runs one single-threaded BLAS GEMM
// (xw_t + h_{t-1} @ W_hh^T forward, grad_pre @ W_hh backward) and one vectorised elementwise pass over the rows
// the GEMM wrote or will read, while they are in cache. Rows that do not run a step cost nothing but, in the
// padded layout, writing their zeros.
//
// This header holds what the whole-stack inference (stack_inference.cpp) and the packed layout's ops (packed.cpp)
// share with recurrence.cpp: the forward's steps and the ops' bodies.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <tuple>

#include "blas.h"
#include "step_layout.h"
#include "work_partition.h"

namespace rnn_fast::cpu {

// Elementwise passes over a run of rows at one step, every row of which runs the step.

template <typename scalar_t>
struct ForwardStep {
  scalar_t* gates;  // [rows, 4H]: pre-activations in; activated gates out when saving
  scalar_t* cell;   // [rows, H], written when saving
  scalar_t* y;      // rows of H, y_stride apart
  scalar_t* h;      // [rows, H] running state, updated in place
  scalar_t* c;      // [rows, H] running state, updated in place
  int64_t rows, hidden, y_stride;
};

// The elementwise passes of the forward, compiled for each target (recurrence.cpp): training keeps the activated
// gates and the cell for the backward, inference keeps neither.
void forward_cells_vectorised(const ForwardStep<float>& s);
void forward_cells_vectorised(const ForwardStep<double>& s);
void inference_cells_vectorised(const ForwardStep<float>& s);
void inference_cells_vectorised(const ForwardStep<double>& s);

template <typename scalar_t>
void zero_rows(scalar_t* rows, int64_t count, int64_t width) {
  std::fill(rows, rows + count * width, scalar_t(0));
}

template <typename scalar_t>
struct ForwardTensors {
  const scalar_t* xw;                      // [D, rows, 4H]
  std::array<const scalar_t*, 2> w_hh;     // [4H, H] of each direction
  scalar_t* y;                             // row r of direction d at y + d * y_direction_stride + r * y_row_stride
  int64_t y_direction_stride, y_row_stride;
  scalar_t* h;      // [D, B, H] running state, h0 in, h_n out
  scalar_t* c;      // [D, B, H] running state, c0 in, c_n out
  scalar_t* gates;  // nullptr for inference: pre-activations then live in a per-thread buffer
  scalar_t* cell;

  scalar_t* y_row(const StepLayout& layout, int64_t direction, int64_t row) const {
    return y + direction * y_direction_stride + (row - direction * layout.direction_rows) * y_row_stride;
  }
};

// A block's xw for a chunk of steps, projected just before they run: row b at time t is
// data[((t - first_time) * rows + b - block.begin) * 4H], and the GEMM accumulates onto it in place.
template <typename scalar_t>
struct XwChunk {
  scalar_t* data = nullptr;
  int64_t first_time = 0, rows = 0;
};

// Steps [first, last) of the direction's processing order, for one block of rows. Pre-activations come from
// out.xw (copied into the saved gates, or into `scratch` for inference) or, when given, from `chunk`.
template <typename scalar_t>
void forward_steps(const StepLayout& layout, int64_t H, const ForwardTensors<scalar_t>& out, RowBlock block,
                   const FixedWeightGemm<scalar_t>& accumulate_gates, scalar_t* scratch, int64_t first, int64_t last,
                   XwChunk<scalar_t> chunk = {}) {
  const int64_t T = layout.T, B = layout.B, G = 4 * H;
  const bool save = out.gates != nullptr;
  const int64_t d = block.direction;
  for (int64_t s = first; s < last; ++s) {
    const int64_t t = d == 0 ? s : T - 1 - s;
    const int64_t step_row = layout.first_row(d, t);
    for_each_run(layout, t, block.begin, block.end, [&](int64_t b, int64_t end, bool runs) {
      const int64_t rows = end - b, row = step_row + b;
      scalar_t* y = out.y_row(layout, d, row);
      if (!runs) {
        if (layout.padded) {
          for (int64_t r = 0; r < rows; ++r) {
            zero_rows(y + r * out.y_row_stride, 1, H);
          }
          if (save) {
            zero_rows(out.gates + row * G, rows, G);
            zero_rows(out.cell + row * H, rows, H);
          }
        }
        return;
      }
      scalar_t* pre;
      if (chunk.data != nullptr) {
        pre = chunk.data + ((t - chunk.first_time) * chunk.rows + b - block.begin) * G;
      } else {
        // xw is read in one streaming copy, and the GEMM then accumulates onto it in cache: cheaper than
        // letting BLAS zero the block (beta = 0) and reading xw again in the elementwise pass.
        pre = save ? out.gates + row * G : scratch;
        std::memcpy(pre, out.xw + row * G, rows * G * sizeof(scalar_t));
      }
      scalar_t* h = out.h + (d * B + b) * H;
      accumulate_gates(h, H, pre, G, rows);
      const ForwardStep<scalar_t> cells{pre, save ? out.cell + row * H : nullptr, y, h, out.c + (d * B + b) * H,
                                        rows, H, out.y_row_stride};
      if (save) {
        forward_cells_vectorised(cells);
      } else {
        inference_cells_vectorised(cells);
      }
    });
  }
}

// The ops' bodies, in either layout: each op builds its layout, then runs the one forward or backward.

// y [*, H] for xw [*, 4H]; h_n, c_n start as h0, c0 and are updated in place; gates and cell only when saving.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_outputs(
    const StepLayout& layout, const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0,
    const at::Tensor& c0, bool save);

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_outputs(const StepLayout& layout, const at::Tensor& grad_y,
                                                                const at::Tensor& grad_h_n,
                                                                const at::Tensor& grad_c_n, const at::Tensor& w_hh,
                                                                const at::Tensor& c0, const at::Tensor& gates,
                                                                const at::Tensor& cell);

}  // namespace rnn_fast::cpu
