// The recurrence's per-step products in bf16 with fp32 accumulation, as nn.LSTM's oneDNN bf16 path computes them:
// out[rows, M] += bf16(in[rows, K]) @ W^T for a bf16 weight W fixed over all T steps (w_hh), fp32 in and out.
//
// Where the CPU has AVX512-BF16, W is reordered once per call into the streamed GEMM's panels (streamed_gemm.h) of
// 16 output columns, each 32-bit lane holding the weights of two consecutive k, and every step multiplies them with
// VDPBF16PS: two bf16 products summed into an fp32 lane per instruction, twice the multiply-adds of an fp32 FMA.
// The step's input rows are rounded to bf16 (round to nearest even, as torch's casts) into a buffer first.
//
// Elsewhere the same products are emulated exactly: W widened to fp32 (exact) and the input rounded to bf16 and
// widened back, through the fp32 streamed kernel. It computes the same sums in another order, for the tests of a
// machine without bf16 instructions; the backend does not choose it for speed (rnn_fast.ops.lstm.cpu).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "streamed_gemm.h"

namespace rnn_fast::cpu {

enum class Bf16Kernel { kNone, kAvx512Bf16, kEmulated };

// Which kernel runs bf16 products: RNN_FAST_CPU_BF16 ("avx512_bf16" or "emulated") when set, else AVX512-BF16 where
// the CPU has it, else none (the Python side then leaves bf16 to nn.LSTM). A value that names no kernel, or one this
// CPU cannot run, raises.
Bf16Kernel bf16_kernel();

// bf16_kernel() by name, for Python: "avx512_bf16", "emulated" or "" (none).
std::string bf16_kernel_name();

class Bf16StepWeights {
 public:
  // W(m, k) = w[m * ldw + k] when `rows_are_outputs`, else w[k * ldw + m] (streamed_gemm.h); `slot` is the calling
  // thread's packed-weight buffer the panels live in.
  Bf16StepWeights(const c10::BFloat16* w, int64_t m, int64_t k, int64_t ldw, bool rows_are_outputs, int slot);

  // out[rows, M] (rows out_ld apart) += bf16(in[rows, K]) (rows in_ld apart) @ W^T.
  void operator()(const float* in, int64_t in_ld, float* out, int64_t out_ld, int64_t rows) const;
  // The same for an input already in bf16 (the input projection's).
  void operator()(const c10::BFloat16* in, int64_t in_ld, float* out, int64_t out_ld, int64_t rows) const;

 private:
  int64_t m_, k_;
  Bf16Kernel kernel_;
  std::vector<Panel> panels_;            // kAvx512Bf16: pairs of k per lane
  std::vector<float> widened_;           // kEmulated: W in fp32, which emulated_ reads
  std::optional<StreamedWeights> emulated_;
};

}  // namespace rnn_fast::cpu
