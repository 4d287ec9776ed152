// The input projection of a layer, xw[d] = bias[d] + sum_p parts[p] @ w_ih[d][:, p*K:(p+1)*K]^T, with xw from
// the output block cache: freshly mapped, xw's page faults cost as much as a recurrence op's elementwise work.
// A layer's input comes in parts [P, T, B, K], read where they lie: the layer input itself (P = 1), possibly a
// batch-first tensor seen time-major, or the previous layer's y [D, T, B, H] (P = D). So neither pass copies
// the input into a time-major matrix or interleaves the directions into [T, B, D*H].
//
// This header holds what the whole-stack inference (stack_inference.cpp) shares with the projection ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <vector>

#include "blas.h"
#include "work_partition.h"

namespace rnn_fast::cpu {

// Below this many multiply-adds a projection runs on the calling thread: MKL's fork and join would cost more.
constexpr int64_t kSequentialProjectionMacs = int64_t(1) << 21;

// parts [P, T, B, K] as memory: element strides between parts, steps and batch rows, unit stride along K.
template <typename scalar_t>
struct PartsView {
  const scalar_t* data;
  int64_t P, T, B, K, part_stride, step_stride, row_stride;
};

// A block of rows of one part, one GEMM: `rows` input rows from `input` (row stride input_ld) into as many output
// rows of xw[d] from `output` (row stride output_ld).
struct ProjectionBlock {
  int64_t input, input_ld, output, output_ld, rows;  // offsets in elements
};

// How a part [T, B, K] tiles into GEMMs: all T * B rows at once when its steps follow each other in memory; one
// GEMM of T rows per batch row when its batch rows do (a batch-first input seen time-major); else one of B rows per
// step. Output offsets are into xw[d] [T, B, G].
template <typename scalar_t>
std::vector<ProjectionBlock> projection_blocks(const PartsView<scalar_t>& parts, int64_t G) {
  const int64_t T = parts.T, B = parts.B;
  if (T == 1 || parts.step_stride == B * parts.row_stride) {
    return {{0, parts.row_stride, 0, G, T * B}};
  }
  std::vector<ProjectionBlock> blocks;
  if (B == 1 || parts.row_stride == T * parts.step_stride) {
    for (int64_t b = 0; b < B; ++b) {
      blocks.push_back({b * parts.row_stride, parts.step_stride, b * G, B * G, T});
    }
  } else {
    for (int64_t t = 0; t < T; ++t) {
      blocks.push_back({t * parts.step_stride, parts.row_stride, t * B * G, G, B});
    }
  }
  return blocks;
}

// xw[d] = bias[d] (or 0), then += parts[p] @ w_ih[d][:, p*K:(p+1)*K]^T, straight to BLAS: at a streaming call's
// size (one step, one row) the ATen ops around each GEMM would cost more than the GEMM. bias[d] is [G] (or nullptr)
// and xw[d] starts at xw + d * xw_direction_stride; part_gemm(d, p, in, in_ld, out, out_ld, rows) adds
// in[rows, K] @ w_ih[d][:, p*K:(p+1)*K]^T to out. One block of rows is one GEMM that MKL may thread; several
// blocks are shared among the threads, each GEMM on one thread; with may_thread false (inside a parallel region)
// everything runs on the calling thread.
// `columns`: the gate columns of xw to write (the whole-stack inference's crews each project their own; the ops
// every column).
template <typename scalar_t, typename PartGemm>
void project_parts(const PartsView<scalar_t>& parts, std::array<const scalar_t*, 2> bias, scalar_t* xw,
                   int64_t xw_direction_stride, int64_t D, const GateColumns& columns, bool may_thread,
                   const PartGemm& part_gemm) {
  const int64_t G = 4 * columns.hidden;
  const std::vector<ProjectionBlock> blocks = projection_blocks(parts, G);
  const int64_t num_tasks = D * static_cast<int64_t>(blocks.size());
  auto project = [&](int64_t task) {
    const int64_t d = task / static_cast<int64_t>(blocks.size());
    const ProjectionBlock& block = blocks[task % blocks.size()];
    scalar_t* out = xw + d * xw_direction_stride + block.output;
    if (bias[d] == nullptr) {
      columns.fill(out, block.rows, block.output_ld, scalar_t(0));
    } else {
      for (int64_t row = 0; row < block.rows; ++row) {
        columns.copy(bias[d], out + row * block.output_ld, 1, 0);
      }
    }
    for (int64_t p = 0; p < parts.P; ++p) {
      part_gemm(d, p, parts.data + p * parts.part_stride + block.input, block.input_ld, out, block.output_ld,
                block.rows);
    }
  };
  const int64_t threads = may_thread ? at::get_num_threads() : 1;
  const bool small = D * parts.T * parts.B * parts.P * parts.K * columns.count * 4 < kSequentialProjectionMacs;
  if (blocks.size() == 1 || small || threads == 1) {
    std::optional<SequentialBlas> sequential;
    if (small || !may_thread) {
      sequential.emplace();
    }
    for (int64_t task = 0; task < num_tasks; ++task) {
      project(task);
    }
    return;
  }
#pragma omp parallel for num_threads(std::min(threads, num_tasks)) schedule(static)
  for (int64_t task = 0; task < num_tasks; ++task) {
    project(task);
  }
}

// That the GEMMs projecting parts [P, T, B, K] onto G columns have the int sizes BLAS takes.
void check_projection_sizes(const at::Tensor& parts, int64_t G);

}  // namespace rnn_fast::cpu
