// The bf16 step products (bf16_gemm.h).
#if defined(__x86_64__) && defined(__GNUC__)
#define RNN_FAST_BF16_KERNELS 1
#include <immintrin.h>
#endif

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "bf16_gemm.h"
#include "blas.h"

namespace rnn_fast::cpu {

namespace {

#if RNN_FAST_BF16_KERNELS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bf16")
namespace avx512_bf16 {
// The streamed kernel over pairs of k: a "float" of `in` and of a panel is the 32-bit lane of two bf16, which
// broadcast() copies bit for bit and fma() multiplies pairwise into the fp32 accumulators.
struct Isa {
  using Vec = __m512;
  static constexpr int kVectors = 1, kPanels = 2, kMaxRows = 12, kWidePanels = 8, kWideMaxRows = 2;
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec broadcast(float x) { return _mm512_set1_ps(x); }
  static Vec fma(Vec pair, Vec w, Vec acc) { return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)pair); }
  static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static void store(float* p, Vec v) { _mm512_store_ps(p, v); }
  static void store_unaligned(float* p, Vec v) { _mm512_storeu_ps(p, v); }
};
#include "streamed_gemm_kernel.inc"

// `rows` rows of `k` floats (in_ld apart) rounded to bf16 into `to`, rows `to_ld` bf16 apart (to_ld >= k rounded up
// to 16), zeros past k.
void round_rows(const float* in, int64_t in_ld, int64_t rows, int64_t k, c10::BFloat16* to, int64_t to_ld) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t kk = 0; kk < k; kk += 16) {
      const __mmask16 valid = k - kk >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (k - kk)) - 1);
      const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(valid, in + r * in_ld + kk));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + r * to_ld + kk), (__m256i)rounded);
    }
  }
}

// Panels of W(r, kk) = w[r * ldw + kk] (rows are outputs): lane c of pair q of panel p holds W(16p + c, 2q) and
// W(16p + c, 2q + 1), a 4-byte neighbour pair of row 16p + c, gathered 16 rows at a time; zeros past m and k.
void gather_row_pairs(const c10::BFloat16* w, int64_t m, int64_t k, int64_t ldw, uint32_t* lanes) {
  const int64_t pairs = (k + 1) / 2, whole_pairs = k / 2;
  const __m512i row_offsets = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
      _mm512_set1_epi32(static_cast<int>(ldw * sizeof(c10::BFloat16))));
  for (int64_t first = 0; first < m; first += kPanelWidth) {
    const int64_t rows = std::min(kPanelWidth, m - first);
    const __mmask16 valid = rows == kPanelWidth ? __mmask16(0xFFFF) : __mmask16((1u << rows) - 1);
    const auto* base = reinterpret_cast<const char*>(w + first * ldw);
    uint32_t* panel = lanes + first * pairs;
    for (int64_t q = 0; q < whole_pairs; ++q) {
      _mm512_storeu_si512(panel + q * kPanelWidth, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid,
                                                                               row_offsets, base + 4 * q, 1));
    }
    if (pairs > whole_pairs) {  // odd k: the last pair is (W(r, k - 1), 0)
      for (int64_t c = 0; c < kPanelWidth; ++c) {
        const c10::BFloat16 pair[2] = {c < rows ? w[(first + c) * ldw + k - 1] : c10::BFloat16(0.0f),
                                       c10::BFloat16(0.0f)};
        std::memcpy(panel + whole_pairs * kPanelWidth + c, pair, sizeof(pair));
      }
    }
  }
}
}  // namespace avx512_bf16
#pragma GCC pop_options
#endif

Bf16Kernel native_kernel() {
#if RNN_FAST_BF16_KERNELS
  static const bool has_bf16 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
  return has_bf16 ? Bf16Kernel::kAvx512Bf16 : Bf16Kernel::kNone;
#else
  return Bf16Kernel::kNone;
#endif
}

// The fp32 streamed kernel the emulation runs on, or kBlas where the CPU has neither AVX-512 nor AVX2.
StepKernel emulation_kernel() { return GemmChoice{}.for_rows(1); }

template <typename T>
T* thread_buffer(size_t count) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < count) {
    buffer.resize(count);
  }
  return buffer.data();
}

// Panels of W(r, kk) = w[kk * ldw + r] (columns are outputs, w_hh read column-wise in the backward), as
// gather_row_pairs lays them out; zeros past m and k.
void column_pairs(const c10::BFloat16* w, int64_t m, int64_t k, int64_t ldw, uint32_t* lanes) {
  const int64_t pairs = (k + 1) / 2;
  std::fill(lanes, lanes + (m + kPanelWidth - 1) / kPanelWidth * pairs * kPanelWidth, 0u);
  for (int64_t row = 0; row < m; ++row) {
    uint32_t* lane = lanes + (row / kPanelWidth) * pairs * kPanelWidth + row % kPanelWidth;
    for (int64_t q = 0; q < pairs; ++q) {
      const c10::BFloat16 pair[2] = {w[2 * q * ldw + row], 2 * q + 1 < k ? w[(2 * q + 1) * ldw + row]
                                                                          : c10::BFloat16(0.0f)};
      std::memcpy(lane + q * kPanelWidth, pair, sizeof(pair));
    }
  }
}

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

}  // namespace

Bf16Kernel bf16_kernel() {
  const char* forced = std::getenv("RNN_FAST_CPU_BF16");
  if (forced == nullptr || *forced == '\0') {
    return native_kernel();
  }
  const std::string name(forced);
  TORCH_CHECK(name == "avx512_bf16" || name == "emulated",
              "RNN_FAST_CPU_BF16 must be \"avx512_bf16\" or \"emulated\", got \"", name, "\"");
  if (name == "avx512_bf16") {
    TORCH_CHECK(native_kernel() == Bf16Kernel::kAvx512Bf16, "RNN_FAST_CPU_BF16=avx512_bf16: this CPU lacks AVX512-BF16");
    return Bf16Kernel::kAvx512Bf16;
  }
  TORCH_CHECK(emulation_kernel() != StepKernel::kBlas, "RNN_FAST_CPU_BF16=emulated needs AVX2 or AVX-512");
  return Bf16Kernel::kEmulated;
}

std::string bf16_kernel_name() {
  switch (bf16_kernel()) {
    case Bf16Kernel::kAvx512Bf16:
      return "avx512_bf16";
    case Bf16Kernel::kEmulated:
      return "emulated";
    default:
      return "";
  }
}

Bf16StepWeights::Bf16StepWeights(const c10::BFloat16* w, int64_t m, int64_t k, int64_t ldw, bool rows_are_outputs,
                                 int slot)
    : m_(m), k_(k), kernel_(bf16_kernel()) {
  TORCH_CHECK(kernel_ != Bf16Kernel::kNone, "bf16 products need AVX512-BF16 (or RNN_FAST_CPU_BF16=emulated)");
  if (kernel_ == Bf16Kernel::kEmulated) {
    widened_.resize(static_cast<size_t>(m * k));
    for (int64_t row = 0; row < m; ++row) {
      for (int64_t kk = 0; kk < k; ++kk) {
        widened_[row * k + kk] = static_cast<float>(rows_are_outputs ? w[row * ldw + kk] : w[kk * ldw + row]);
      }
    }
    emulated_.emplace(widened_.data(), m, k, k, true, slot, emulation_kernel());
    return;
  }
  // Panel p, pair q: 16 lanes of (W(16p + c, 2q), W(16p + c, 2q + 1)), zeros past M and K.
  const int64_t count = (m + kPanelWidth - 1) / kPanelWidth, pairs = (k + 1) / 2;
  auto* lanes = reinterpret_cast<uint32_t*>(
      PackedWeightBuffer::get(static_cast<size_t>(count * pairs * kPanelWidth) * sizeof(float), slot));
#if RNN_FAST_BF16_KERNELS
  if (rows_are_outputs) {
    avx512_bf16::gather_row_pairs(w, m, k, ldw, lanes);
  } else {
    column_pairs(w, m, k, ldw, lanes);
  }
#endif
  for (int64_t p = 0; p < count; ++p) {
    panels_.push_back({reinterpret_cast<const float*>(lanes + p * pairs * kPanelWidth), kPanelWidth});
  }
}

void Bf16StepWeights::operator()(const float* in, int64_t in_ld, float* out, int64_t out_ld, int64_t rows) const {
  if (kernel_ == Bf16Kernel::kEmulated) {
    float* rounded = thread_buffer<float>(static_cast<size_t>(rows * k_));
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t kk = 0; kk < k_; ++kk) {
        rounded[r * k_ + kk] = static_cast<float>(c10::BFloat16(in[r * in_ld + kk]));
      }
    }
    (*emulated_)(rounded, k_, out, out_ld, rows);
    return;
  }
#if RNN_FAST_BF16_KERNELS
  // Each row as bf16 pairs, 16-aligned so that the rounding writes whole vectors; a pair is one "float" lane.
  const int64_t ld = round_up(k_, 16);
  c10::BFloat16* pairs = thread_buffer<c10::BFloat16>(static_cast<size_t>(rows * ld));
  avx512_bf16::round_rows(in, in_ld, rows, k_, pairs, ld);
  avx512_bf16::streamed_gemm(reinterpret_cast<const float*>(pairs), ld / 2, panels_, m_, (k_ + 1) / 2, out, out_ld,
                             rows);
#endif
}

void Bf16StepWeights::operator()(const c10::BFloat16* in, int64_t in_ld, float* out, int64_t out_ld,
                                 int64_t rows) const {
  if (kernel_ == Bf16Kernel::kEmulated) {
    float* widened = thread_buffer<float>(static_cast<size_t>(rows * k_));
    for (int64_t r = 0; r < rows; ++r) {
      std::transform(in + r * in_ld, in + r * in_ld + k_, widened + r * k_,
                     [](c10::BFloat16 x) { return static_cast<float>(x); });
    }
    (*emulated_)(widened, k_, out, out_ld, rows);
    return;
  }
#if RNN_FAST_BF16_KERNELS
  // Rows are read as pairs where they hold whole pairs at 4-byte boundaries; else they are copied out, padded.
  const int64_t pairs = (k_ + 1) / 2;
  if (k_ % 2 == 0 && in_ld % 2 == 0 && reinterpret_cast<uintptr_t>(in) % 4 == 0) {
    avx512_bf16::streamed_gemm(reinterpret_cast<const float*>(in), in_ld / 2, panels_, m_, pairs, out, out_ld, rows);
    return;
  }
  c10::BFloat16* padded = thread_buffer<c10::BFloat16>(static_cast<size_t>(rows * pairs * 2));
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(in + r * in_ld, in + r * in_ld + k_, padded + r * pairs * 2);
    if (k_ % 2 == 1) {
      padded[r * pairs * 2 + k_] = c10::BFloat16(0.0f);
    }
  }
  avx512_bf16::streamed_gemm(reinterpret_cast<const float*>(padded), pairs, panels_, m_, pairs, out, out_ld, rows);
#endif
}

}  // namespace rnn_fast::cpu
