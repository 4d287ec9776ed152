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
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "bf16_gemm.h"
#include "blas.h"
#include "step_layout.h"
#include "streamed_gemm.h"
#include "work_partition.h"

namespace rnn_fast::cpu {

// Elementwise passes over a run of rows at one step, every row of which runs the step.

// Units [0, units) of a row from each pointer, which the caller offsets to the item's first unit; rows are H (4H for
// gates, whose gates lie H apart) or y_stride apart.
template <typename scalar_t>
struct ForwardStep {
  scalar_t* gates;  // [rows, 4H]: pre-activations in; activated gates out when saving
  scalar_t* cell;   // [rows, H], written when saving
  scalar_t* y;      // rows of H, y_stride apart
  scalar_t* h;      // [rows, H] the new state, written (in place, or into the crew's other buffer)
  scalar_t* c;      // [rows, H] running state, updated in place
  int64_t rows, hidden, y_stride, units;
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

// A weight matrix as the step GEMMs read it: in the steps' own dtype, or in bf16 for bf16 products (float32 steps
// only, which weights_of enforces; bf16_gemm.h). At most one of the two is set.
template <typename scalar_t>
struct Weights {
  const scalar_t* full = nullptr;
  const c10::BFloat16* bf16 = nullptr;

  Weights() = default;
  Weights(const scalar_t* w) : full(w) {}  // NOLINT: a plain pointer is the usual case
  Weights(const c10::BFloat16* w) : bf16(w) {}  // NOLINT

  // Weights `offset` elements further on.
  Weights operator+(int64_t offset) const { return bf16 != nullptr ? Weights(bf16 + offset) : Weights(full + offset); }
};

// A weight tensor's data: bf16 for bf16 products, else of the steps' dtype (the ops' checks have said which).
template <typename scalar_t>
Weights<scalar_t> weights_of(const at::Tensor& w) {
  if (w.scalar_type() == at::kBFloat16) {
    TORCH_CHECK((std::is_same_v<scalar_t, float>), "bf16 weights multiply float32 steps only");
    return Weights<scalar_t>(w.data_ptr<c10::BFloat16>());
  }
  return Weights<scalar_t>(w.data_ptr<scalar_t>());
}

template <typename scalar_t>
struct ForwardTensors {
  const scalar_t* xw;                      // [D, rows, 4H]
  std::array<Weights<scalar_t>, 2> w_hh;   // [4H, H] of each direction
  scalar_t* y;                             // row r of direction d at y + d * y_direction_stride + r * y_row_stride
  int64_t y_direction_stride, y_row_stride;
  scalar_t* h;      // [D, B, H] running state, h0 in, h_n out
  scalar_t* c;      // [D, B, H] running state, c0 in, c_n out
  scalar_t* gates;  // nullptr for inference: pre-activations then live in a per-thread buffer
  scalar_t* cell;
  // [D, B, H], for crews (work_partition.h): a step reads every unit of h while the crew writes the next h, so the
  // state alternates between h (before even steps) and this buffer (before odd ones). nullptr without crews.
  scalar_t* h_other = nullptr;

  // The state before processing step s (h_read) and after it (h_write).
  scalar_t* h_read(int64_t s) const { return h_other != nullptr && s % 2 == 1 ? h_other : h; }
  scalar_t* h_write(int64_t s) const { return h_other != nullptr && s % 2 == 0 ? h_other : h; }

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

// One weight block's per-step GEMM, out[rows, M] += in[rows, K] @ op(W) as FixedWeightGemm defines it: the streamed
// kernel for float steps of few rows where the CPU has it, else BLAS; for a bf16 W, the bf16 products of
// bf16_gemm.h (float steps only).
template <typename scalar_t>
class StepGemm {
 public:
  StepGemm(Weights<scalar_t> w, int64_t m, int64_t k, int64_t ldw, bool transposed, int64_t calls, int64_t rows,
           int slot, const GemmChoice& choice) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (w.bf16 != nullptr) {
        float_kernels_.bf16.emplace(w.bf16, m, k, ldw, transposed, slot);
        return;
      }
      if (const StepKernel kernel = choice.for_rows(rows); kernel != StepKernel::kBlas) {
        float_kernels_.streamed.emplace(w.full, m, k, ldw, transposed, slot, kernel);
        return;
      }
    }
    blas_.emplace(w.full, m, k, ldw, transposed, calls, rows, slot);
  }

  void operator()(const scalar_t* in, int64_t in_ld, scalar_t* out, int64_t out_ld, int64_t rows) const {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (float_kernels_.streamed.has_value()) {
        (*float_kernels_.streamed)(in, in_ld, out, out_ld, rows);
        return;
      }
      if (float_kernels_.bf16.has_value()) {
        (*float_kernels_.bf16)(in, in_ld, out, out_ld, rows);
        return;
      }
    }
    (*blas_)(in, in_ld, out, out_ld, rows);
  }

 private:
  // The kernels of float steps only: the streamed one, and bf16 products.
  struct FloatKernels {
    std::optional<StreamedWeights> streamed;
    std::optional<Bf16StepWeights> bf16;
  };
  struct NoKernels {};
  std::conditional_t<std::is_same_v<scalar_t, float>, FloatKernels, NoKernels> float_kernels_;
  std::optional<FixedWeightGemm<scalar_t>> blas_;
};

// The forward's per-step GEMMs of one item, out[rows, owned columns] += in[rows, K] @ w[owned rows, K]^T with w's
// rows ldw apart: w_hh (K = ldw = H) in the recurrence, a part of w_ih in the whole-stack inference's projection. One
// GEMM over all 4H rows of w when the item owns every unit, else one per gate.
template <typename scalar_t>
class GateGemms {
 public:
  GateGemms(Weights<scalar_t> w, int64_t k, int64_t ldw, const GateColumns& columns, int64_t calls, int64_t rows,
            int first_slot, const GemmChoice& choice)
      : columns_(columns) {
    for (int64_t block = 0; block < columns.blocks(); ++block) {
      gemms_.emplace_back(w + columns.block_offset(block) * ldw, columns.block_width(), k, ldw, true, calls, rows,
                          first_slot + static_cast<int>(block), choice);
    }
  }

  void operator()(const scalar_t* in, int64_t in_ld, scalar_t* out, int64_t out_ld, int64_t rows) const {
    for (int64_t block = 0; block < columns_.blocks(); ++block) {
      gemms_[block](in, in_ld, out + columns_.block_offset(block), out_ld, rows);
    }
  }

 private:
  GateColumns columns_;
  std::vector<StepGemm<scalar_t>> gemms_;
};

template <typename scalar_t>
GateGemms<scalar_t> recurrent_gemms(Weights<scalar_t> w_hh, const WorkItem& item, int64_t H, int64_t steps,
                                    int first_slot = 0) {
  return GateGemms<scalar_t>(w_hh, H, H, GateColumns(item, H), steps, std::min(kRowsPerSubBlock, item.rows()),
                             first_slot, item.gemm);
}

// Steps [first, last) of the direction's processing order, for one work item. Pre-activations come from out.xw
// (copied into the saved gates, or into `scratch` for inference) or, when given, from `chunk`. An item that is one
// of a crew waits for the crew after every step.
template <typename scalar_t>
void forward_steps(const StepLayout& layout, int64_t H, const ForwardTensors<scalar_t>& out, const WorkItem& item,
                   const GateGemms<scalar_t>& accumulate_gates, scalar_t* scratch, int64_t first, int64_t last,
                   XwChunk<scalar_t> chunk = {}) {
  const int64_t T = layout.T, B = layout.B, G = 4 * H;
  const bool save = out.gates != nullptr;
  const int64_t d = item.direction, j0 = item.unit_begin, units = item.units();
  const GateColumns columns(item, H);
  for (int64_t s = first; s < last; ++s) {
    const int64_t t = d == 0 ? s : T - 1 - s;
    const int64_t step_row = layout.first_row(d, t);
    scalar_t* const h_read = out.h_read(s);
    scalar_t* const h_write = out.h_write(s);
    for_each_run(layout, t, item.begin, item.end, [&](int64_t b, int64_t end, bool runs) {
      const int64_t rows = end - b, row = step_row + b;
      scalar_t* y = out.y_row(layout, d, row) + j0;
      if (!runs) {
        if (layout.padded) {
          for (int64_t r = 0; r < rows; ++r) {
            zero_rows(y + r * out.y_row_stride, 1, units);
          }
          if (save) {
            columns.fill(out.gates + row * G, rows, G, scalar_t(0));
            for (int64_t r = 0; r < rows; ++r) {
              zero_rows(out.cell + (row + r) * H + j0, 1, units);
            }
          }
        }
        if (h_write != h_read) {
          // The state passes through a step the row does not run.
          for (int64_t r = 0; r < rows; ++r) {
            const scalar_t* from = h_read + (d * B + b + r) * H + j0;
            std::copy(from, from + units, h_write + (d * B + b + r) * H + j0);
          }
        }
        return;
      }
      scalar_t* pre;
      if (chunk.data != nullptr) {
        pre = chunk.data + ((t - chunk.first_time) * chunk.rows + b - item.begin) * G;
      } else {
        // xw is read in one streaming copy, and the GEMM then accumulates onto it in cache: cheaper than
        // letting BLAS zero the block (beta = 0) and reading xw again in the elementwise pass.
        pre = save ? out.gates + row * G : scratch;
        columns.copy(out.xw + row * G, pre, rows, G);
      }
      accumulate_gates(h_read + (d * B + b) * H, H, pre, G, rows);
      const ForwardStep<scalar_t> cells{pre + j0, save ? out.cell + row * H + j0 : nullptr, y,
                                        h_write + (d * B + b) * H + j0, out.c + (d * B + b) * H + j0,
                                        rows, H, out.y_row_stride, units};
      if (save) {
        forward_cells_vectorised(cells);
      } else {
        inference_cells_vectorised(cells);
      }
    });
    crew_barrier(item);
  }
}

// After a crew's last step [.., last): the state in out.h, where h_n is read from.
template <typename scalar_t>
void settle_state(const StepLayout& layout, int64_t H, const ForwardTensors<scalar_t>& out, const WorkItem& item,
                  int64_t last) {
  const scalar_t* final_state = out.h_read(last);
  if (final_state == out.h) {
    return;
  }
  for (int64_t b = item.begin; b < item.end; ++b) {
    const scalar_t* from = final_state + (item.direction * layout.B + b) * H + item.unit_begin;
    std::copy(from, from + item.units(), out.h + (item.direction * layout.B + b) * H + item.unit_begin);
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
