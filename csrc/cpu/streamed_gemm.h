// A GEMM for the recurrence's per-step products of few rows, out[rows, M] += in[rows, K] @ W^T for a weight W [M, K]
// fixed over all T steps: h @ w_hh^T forward, grad_pre @ w_hh backward.
//
// With few rows the product is a stream of weights: each weight is multiplied by only `rows` inputs, so the step
// is bound by how fast W arrives from the caches. BLAS's general kernels reach about half a core's FMA rate there
// (measured on AMD Zen 4 with MKL's SGEMM, 8 rows). This one reorders W once per call into panels of 16 output
// columns stored k after k ([K][16] per panel, zero-padded past M), so that every step reads W as one sequential
// stream, a vector of 16 weights at a time against up to 8 rows held in registers (AVX-512) or 4 (AVX2 + FMA).
// It is compiled for those two instruction sets and picked at run time; without either, BLAS runs instead. Where W's
// rows are already the k (w_hh read column-wise in the backward), the panels are W itself, 16 columns of each row,
// and only a last partial panel is copied out.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

namespace rnn_fast::cpu {

// Panels are 16 columns wide: one AVX-512 vector, two AVX2 vectors.
constexpr int64_t kPanelWidth = 16;

// 16 columns of W^T, [K][16]: row kk at data + kk * stride.
struct Panel {
  const float* data;
  int64_t stride;
};

enum class StepKernel { kBlas, kAvx512, kAvx2 };

// Rows up to which a float step GEMM runs the streamed kernel rather than BLAS.
constexpr int64_t kStreamedMaxRows = 128;

// Which kernel runs a float step GEMM: RNN_FAST_CPU_GEMM ("blas", "avx512" or "avx2") when set, else the streamed
// kernel of the widest instruction set this CPU has (AVX-512F, or AVX2 with FMA) up to kStreamedMaxRows rows, else
// BLAS.
struct GemmChoice {
  std::optional<StepKernel> forced;

  StepKernel for_rows(int64_t rows) const;
};

// Reads RNN_FAST_CPU_GEMM. An op calls it once, outside its parallel regions: a value that names no kernel, or an
// instruction set this CPU lacks, raises.
GemmChoice gemm_choice();

class StreamedWeights {
 public:
  // W(m, k) = w[m * ldw + k] when `rows_are_outputs` (w_hh [4H, H] in the forward, output m = a gate unit), else
  // w[k * ldw + m] (w_hh read column-wise in the backward, output m = a hidden unit, k = a gate unit). The panels
  // live in the calling thread's packed-weight buffer `slot` (blas.h) until the next weight that uses it.
  StreamedWeights(const float* w, int64_t m, int64_t k, int64_t ldw, bool rows_are_outputs, int slot,
                  StepKernel kernel);

  // out[rows, M] (rows out_ld apart) += in[rows, K] (rows in_ld apart) @ W^T.
  void operator()(const float* in, int64_t in_ld, float* out, int64_t out_ld, int64_t rows) const;

 private:
  std::vector<Panel> panels_;  // ceil(M / 16) of them
  int64_t m_, k_;
  StepKernel kernel_;
};

}  // namespace rnn_fast::cpu
