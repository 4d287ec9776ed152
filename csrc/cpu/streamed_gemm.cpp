// The streamed GEMM's panels and kernels (streamed_gemm.h).
#if defined(__x86_64__) && defined(__GNUC__)
#define RNN_FAST_STREAMED_KERNELS 1
#include <immintrin.h>
#endif

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "blas.h"
#include "streamed_gemm.h"

namespace rnn_fast::cpu {

namespace {

#if RNN_FAST_STREAMED_KERNELS
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
struct Isa {
  using Vec = __m512;
  static constexpr int kVectors = 1, kPanels = 2, kMaxRows = 12;  // 24 accumulators of the 32 registers
  static constexpr int kWidePanels = 8, kWideMaxRows = 2;          // 16
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec broadcast(float x) { return _mm512_set1_ps(x); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static void store(float* p, Vec v) { _mm512_store_ps(p, v); }
  static void store_unaligned(float* p, Vec v) { _mm512_storeu_ps(p, v); }
};
#include "streamed_gemm_kernel.inc"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
struct Isa {
  using Vec = __m256;
  static constexpr int kVectors = 2, kPanels = 1, kMaxRows = 6;  // 12 accumulators of the 16 registers
  static constexpr int kWidePanels = 3, kWideMaxRows = 1;         // 6
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec broadcast(float x) { return _mm256_set1_ps(x); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static void store(float* p, Vec v) { _mm256_store_ps(p, v); }
  static void store_unaligned(float* p, Vec v) { _mm256_storeu_ps(p, v); }
};
#include "streamed_gemm_kernel.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

StepKernel widest_kernel() {
#if RNN_FAST_STREAMED_KERNELS
  static const StepKernel kernel =
      __builtin_cpu_supports("avx512f")                                   ? StepKernel::kAvx512
      : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? StepKernel::kAvx2
                                                                          : StepKernel::kBlas;
  return kernel;
#else
  return StepKernel::kBlas;
#endif
}

}  // namespace

StepKernel GemmChoice::for_rows(int64_t rows) const {
  if (forced.has_value()) {
    return *forced;
  }
  return rows <= kStreamedMaxRows ? widest_kernel() : StepKernel::kBlas;
}

GemmChoice gemm_choice() {
  const char* forced = std::getenv("RNN_FAST_CPU_GEMM");
  if (forced == nullptr || *forced == '\0') {
    return {};
  }
  const std::string name(forced);
  TORCH_CHECK(name == "blas" || name == "avx512" || name == "avx2",
              "RNN_FAST_CPU_GEMM must be \"blas\", \"avx512\" or \"avx2\", got \"", name, "\"");
  const StepKernel kernel = name == "avx512" ? StepKernel::kAvx512
                            : name == "avx2" ? StepKernel::kAvx2
                                             : StepKernel::kBlas;
  const StepKernel widest = widest_kernel();
  TORCH_CHECK(kernel == StepKernel::kBlas || kernel == widest ||
                  (kernel == StepKernel::kAvx2 && widest == StepKernel::kAvx512),
              "RNN_FAST_CPU_GEMM=", name, ": this CPU lacks that instruction set");
  return {kernel};
}

StreamedWeights::StreamedWeights(const float* w, int64_t m, int64_t k, int64_t ldw, bool rows_are_outputs, int slot,
                                 StepKernel kernel)
    : m_(m), k_(k), kernel_(kernel) {
  const int64_t count = (m + kPanelWidth - 1) / kPanelWidth;
  // Panels read from W itself where its rows run along k and hold all 16 columns; the others are copied out.
  const int64_t direct = rows_are_outputs ? 0 : m / kPanelWidth;
  float* copied = PackedWeightBuffer::get(static_cast<size_t>((count - direct) * k * kPanelWidth) * sizeof(float),
                                          slot);
  for (int64_t p = 0; p < count; ++p) {
    const int64_t first = p * kPanelWidth, columns = std::min(kPanelWidth, m - first);
    if (p < direct) {
      panels_.push_back({w + first, ldw});
      continue;
    }
    float* panel = copied + (p - direct) * k * kPanelWidth;
    // Column c of the panel is row first + c of W: one row of w when rows are outputs, else a column; zeros past M.
    for (int64_t c = 0; c < kPanelWidth; ++c) {
      for (int64_t kk = 0; kk < k; ++kk) {
        panel[kk * kPanelWidth + c] = c >= columns        ? 0.0f
                                      : rows_are_outputs ? w[(first + c) * ldw + kk]
                                                         : w[kk * ldw + first + c];
      }
    }
    panels_.push_back({panel, kPanelWidth});
  }
}

void StreamedWeights::operator()(const float* in, int64_t in_ld, float* out, int64_t out_ld, int64_t rows) const {
#if RNN_FAST_STREAMED_KERNELS
  if (kernel_ == StepKernel::kAvx512) {
    avx512::streamed_gemm(in, in_ld, panels_, m_, k_, out, out_ld, rows);
  } else {
    avx2::streamed_gemm(in, in_ld, panels_, m_, k_, out, out_ld, rows);
  }
#endif
}

}  // namespace rnn_fast::cpu
