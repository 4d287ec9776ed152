// Fused CPU recurrence of the LSTM contract (docs/contract.md), float32 and float64: training forward and
// backward, and an inference forward that keeps no gates or cells, each in the padded layout [D, T, B, *] and in
// the packed layout [D, N, *] of PackedSequence data. Plus the cpu backend's input projection
// (rnn_fast::cpu_input_projection), the packed layout's grad_w_hh, and the cache of output blocks they draw from.
//
// Batch rows never interact in an LSTM, so each OpenMP thread owns one (direction, block of rows) for all T
// steps and never waits for another thread. A step computes only the rows that run it (t < lengths[b]).
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/native/TensorFactories.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <omp.h>

#include "../recurrence_checks.h"

// The Fortran BLAS that ATen itself calls (MKL in the PyTorch wheels, exported by libtorch_cpu). Called
// inside our parallel region, MKL runs single-threaded, which is what the row partition wants.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
// MKL's per-thread thread count, through its Fortran interface like the GEMMs above, where MKL is the BLAS
// (weak: absent from other BLAS builds). Returns the previous setting.
int mkl_set_num_threads_local_(const int* threads) __attribute__((weak));
// MKL's packed single-precision GEMM (weak, as above; MKL_INT is int in the LP64 interface torch links).
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

// The one dtype dispatch of this file: float32 and float64, with the state kept in the same dtype.
#define DISPATCH_FLOAT_AND_DOUBLE(TYPE, NAME, ...)                                                      \
  [&] {                                                                                                 \
    switch (TYPE) {                                                                                     \
      case at::ScalarType::Float: {                                                                     \
        using scalar_t = float;                                                                         \
        return __VA_ARGS__();                                                                           \
      }                                                                                                 \
      case at::ScalarType::Double: {                                                                    \
        using scalar_t = double;                                                                        \
        return __VA_ARGS__();                                                                           \
      }                                                                                                 \
      default:                                                                                          \
        TORCH_CHECK(false, NAME ": the CPU backend supports float32 and float64, got ", TYPE);         \
    }                                                                                                   \
  }()

// Each elementwise pass is compiled for AVX-512, AVX2 and baseline x86-64; the loader picks one per CPU. What
// the clones call must be inlined into each of them to be compiled for its target.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// As PyTorch itself is built: without it GCC vectorises the activations for AVX-512 only.
#pragma GCC optimize("no-trapping-math")
#define RNN_FAST_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define RNN_FAST_INLINE inline __attribute__((always_inline))
#else
#define RNN_FAST_TARGET_CLONES
#define RNN_FAST_INLINE inline
#endif

namespace {

// Rows per GEMM + elementwise sub-block: small enough that the GEMM's output is still in L2 when the
// elementwise pass reads it, large enough to keep the GEMM efficient.
constexpr int64_t kRowsPerSubBlock = 128;

// ---------------------------------------------------------------------------------------------------------
// Activations, within about 2x torch's own float32 error against float64 (tests/ops/test_extension_cpu.py).
// float32 builds both from one vectorisable e^y = 2^n e^r (|r| <= ln2/2, e^r - 1 from its Taylor series to r^7,
// truncation below 1e-8): e^y + 1 = 2^n (e^r - 1) + (2^n + 1) is then exact but for one rounding, so
// sigmoid = 1 / (1 + e^-x) keeps its relative accuracy down to e^-87, and tanh = 1 - 2 / (e^2|x| + 1) is accurate
// where that difference does not cancel, |x| >= 0.9; below, an odd minimax polynomial (fitted for rnn_fast) takes
// over. float64 uses libm, since its tests are held to 1e-9.

struct ScaledExpMinusOne {
  float scale;          // 2^n
  float mantissa_less;  // e^r - 1, so that e^y = scale * (mantissa_less + 1)
};

RNN_FAST_INLINE ScaledExpMinusOne split_exp(float y) {
  y = y < -87.0f ? -87.0f : y;  // not std::min/max: those are compiled before the pragma above
  y = y > 88.0f ? 88.0f : y;    // 2^n stays a normal float
  constexpr float kRoundingShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (y * 1.44269504088896341f + kRoundingShift) - kRoundingShift;
  // ln 2 in two parts, the first exact in float, so that r = y - n ln2 is exact to float precision.
  const float r = (y - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = r * (1.0f / 5040) + (1.0f / 720);
  p = p * r + (1.0f / 120);
  p = p * r + (1.0f / 24);
  p = p * r + (1.0f / 6);
  p = p * r + 0.5f;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &exponent_bits, sizeof(scale));
  return {scale, r + r * r * p};
}

RNN_FAST_INLINE float exp_plus_one(float y) {
  const ScaledExpMinusOne e = split_exp(y);
  return e.scale * e.mantissa_less + (e.scale + 1.0f);
}

RNN_FAST_INLINE float tanh_activation(float x) {
  const float a = x < 0.0f ? -x : x;
  const float large = 1.0f - 2.0f / exp_plus_one(2.0f * a);
  const float z = x * x;
  float q = z * -4.5565e-4f + 2.5833e-3f;
  q = q * z + -8.26538e-3f;
  q = q * z + 2.166408e-2f;
  q = q * z + -5.392947e-2f;
  q = q * z + 1.3332981e-1f;
  q = q * z + -3.3333322e-1f;
  const float small = x + x * z * q;
  return a < 0.9f ? small : (x < 0.0f ? -large : large);
}

RNN_FAST_INLINE float sigmoid_activation(float x) { return 1.0f / exp_plus_one(-x); }
RNN_FAST_INLINE double tanh_activation(double x) { return std::tanh(x); }
RNN_FAST_INLINE double sigmoid_activation(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// ---------------------------------------------------------------------------------------------------------
// BLAS, row-major views of column-major calls.

inline void blas_gemm(const char* transa, const char* transb, int m, int n, int k, const float* a, int lda,
                      const float* b, int ldb, float beta, float* c, int ldc) {
  const float one = 1.0f;
  sgemm_(transa, transb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
}

inline void blas_gemm(const char* transa, const char* transb, int m, int n, int k, const double* a, int lda,
                      const double* b, int ldb, double beta, double* c, int ldc) {
  const double one = 1.0;
  dgemm_(transa, transb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
}

// out[n, M] += in[n, K] @ op(W), for a weight W that stays fixed over many calls of few rows: a recurrence's steps,
// a stack's chunks. op(W) = W^T for W [M, K] (transposed) or W for W [K, M], rows ldw apart. Where MKL provides its
// packed GEMM (float), W goes into MKL's packed format once, which about halves a GEMM of 1 to 16 rows (4.3 -> 2.3
// us for one row of w_hh at H = 128); packing costs about what 15 such calls save, so only a user that makes at
// least kMinCallsToPack calls packs.
constexpr int64_t kMinCallsToPack = 16;

// Packed weights per thread, kept across calls (about 1 MB written of the 9 MB MKL asks for a 512 x 128 w_hh): one
// per weight a thread uses at once (slot), a few at most.
constexpr int kPackedWeightSlots = 6;

class PackedWeightBuffer {
 public:
  static float* get(size_t bytes, int slot) {
    thread_local std::array<PackedWeightBuffer, kPackedWeightSlots> buffers;
    PackedWeightBuffer& buffer = buffers[slot];
    if (buffer.bytes_ < bytes) {
      std::free(buffer.data_);
      buffer.data_ = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
      buffer.bytes_ = buffer.data_ == nullptr ? 0 : bytes;
    }
    return static_cast<float*>(buffer.data_);
  }
  ~PackedWeightBuffer() { std::free(data_); }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

template <typename scalar_t>
class FixedWeightGemm {
 public:
  FixedWeightGemm(const scalar_t* w, int64_t m, int64_t k, int64_t ldw, bool transposed, int64_t calls,
                  int64_t rows, int slot = 0)
      : w_(w), m_(static_cast<int>(m)), k_(static_cast<int>(k)), ldw_(static_cast<int>(ldw)),
        transposed_(transposed) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (calls >= kMinCallsToPack && slot < kPackedWeightSlots && cblas_sgemm_compute != nullptr &&
          cblas_sgemm_pack != nullptr && cblas_sgemm_pack_get_size != nullptr) {
        const int n = static_cast<int>(std::min(rows, kRowsPerSubBlock));
        packed_ = PackedWeightBuffer::get(cblas_sgemm_pack_get_size(kAMatrix, m_, n, k_), slot);
        if (packed_ != nullptr) {
          cblas_sgemm_pack(kColMajor, kAMatrix, transposed ? kTrans : kNoTrans, m_, n, k_, 1.0f, w, ldw_, packed_);
        }
      }
    }
  }

  // Row-major out[rows, M] (rows out_ld apart) += in[rows, K] (rows in_ld apart) @ op(W), as column-major
  // out^T = op(W)^T @ in^T.
  void operator()(const scalar_t* in, int64_t in_ld, scalar_t* out, int64_t out_ld, int64_t rows) const {
    const int n = static_cast<int>(rows);
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (packed_ != nullptr) {
        cblas_sgemm_compute(kColMajor, kPacked, kNoTrans, m_, n, k_, packed_, ldw_, in, static_cast<int>(in_ld),
                            1.0f, out, static_cast<int>(out_ld));
        return;
      }
    }
    blas_gemm(transposed_ ? "T" : "N", "N", m_, n, k_, w_, ldw_, in, static_cast<int>(in_ld), scalar_t(1), out,
              static_cast<int>(out_ld));
  }

 private:
  // CBLAS's enumerators.
  static constexpr int kColMajor = 102, kNoTrans = 111, kTrans = 112, kPacked = 151, kAMatrix = 161;
  const scalar_t* w_;
  int m_, k_, ldw_;
  bool transposed_;
  float* packed_ = nullptr;
};

// The recurrence's per-step GEMMs of one direction: forward pre[rows, 4H] += h[rows, H] @ w_hh[4H, H]^T, backward
// dh[rows, H] += grad_pre[rows, 4H] @ w_hh[4H, H], for a block of rows over `steps` steps.
template <typename scalar_t>
FixedWeightGemm<scalar_t> gates_gemm(const scalar_t* w_hh, int64_t H, int64_t steps, int64_t rows, int slot = 0) {
  return FixedWeightGemm<scalar_t>(w_hh, 4 * H, H, H, true, steps, rows, slot);
}

template <typename scalar_t>
FixedWeightGemm<scalar_t> hidden_grad_gemm(const scalar_t* w_hh, int64_t H, int64_t steps, int64_t rows) {
  return FixedWeightGemm<scalar_t>(w_hh, H, 4 * H, H, false, steps, rows);
}

// ---------------------------------------------------------------------------------------------------------
// Outputs. Fresh memory costs a page fault and the kernel zeroing each page at first touch; for the
// [D, T, B, 4H] gates and grad_xw of the classifier that costs about as much as the recurrence's GEMMs.
// Training repeats the same shapes every iteration, so the large outputs come from a cache of blocks that
// outlives them: a block freed with one iteration's tensors is taken again, already mapped, by the next.
// Blocks match by exact size. At most kMaxCachedBytes sit unused in the cache; beyond that the blocks unused
// for longest (shapes no longer run) go back to the system, as do all unused blocks on request
// (rnn_fast::cpu_release_cached_blocks). New blocks ask for transparent huge pages (one fault per 2 MiB instead
// of per 4 KiB).

class OutputBlockCache final : public c10::Allocator {
 public:
  static constexpr size_t kMinBlockBytes = size_t(1) << 20;
  static constexpr size_t kMaxCachedBytes = size_t(2) << 30;

  static OutputBlockCache& instance() {
    // Never destroyed: tensors holding its blocks may outlive static destruction.
    static auto* cache = new OutputBlockCache();
    return *cache;
  }

  c10::DataPtr allocate(size_t nbytes) override {
    void* data = take(nbytes);
    if (data == nullptr) {
      data = map_new(nbytes);
    }
    return {data, new Block{data, nbytes}, &OutputBlockCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Gives every unused block back to the system; returns how many bytes that was.
  int64_t release_unused() {
    std::list<Block> unused;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      unused.swap(unused_);
      by_size_.clear();
      unused_bytes_ = 0;
    }
    int64_t released = 0;
    for (const Block& block : unused) {
      std::free(block.data);
      released += static_cast<int64_t>(block.nbytes);
    }
    return released;
  }

 private:
  struct Block {
    void* data;
    size_t nbytes;
  };
  static constexpr size_t kHugePage = size_t(2) << 20;

  void* take(size_t nbytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = by_size_.find(nbytes);
    if (found == by_size_.end()) {
      return nullptr;
    }
    void* data = found->second->data;
    unused_.erase(found->second);
    by_size_.erase(found);
    unused_bytes_ -= nbytes;
    return data;
  }

  static void* map_new(size_t nbytes) {
    const size_t rounded = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = std::aligned_alloc(kHugePage, rounded);
    TORCH_CHECK(data != nullptr, "rnn_fast: out of memory allocating ", nbytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(data, rounded, MADV_HUGEPAGE);  // advice only: if declined, the pages are simply 4 KiB
#endif
    return data;
  }

  static void release(void* context) {
    std::unique_ptr<Block> block(static_cast<Block*>(context));
    OutputBlockCache& cache = instance();
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(cache.mutex_);
      cache.unused_.push_front(*block);
      cache.by_size_.emplace(block->nbytes, cache.unused_.begin());
      cache.unused_bytes_ += block->nbytes;
      while (cache.unused_bytes_ > kMaxCachedBytes) {
        const Block oldest = cache.unused_.back();
        auto [first, last] = cache.by_size_.equal_range(oldest.nbytes);
        for (auto entry = first; entry != last; ++entry) {
          if (entry->second == std::prev(cache.unused_.end())) {
            cache.by_size_.erase(entry);
            break;
          }
        }
        cache.unused_.pop_back();
        cache.unused_bytes_ -= oldest.nbytes;
        evicted.push_back(oldest.data);
      }
    }
    for (void* data : evicted) {
      std::free(data);
    }
  }

  std::mutex mutex_;
  std::list<Block> unused_;  // most recently freed first
  std::unordered_multimap<size_t, std::list<Block>::iterator> by_size_;
  size_t unused_bytes_ = 0;
};

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t nbytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
  if (nbytes < OutputBlockCache::kMinBlockBytes) {
    return at::empty(sizes, options);
  }
  at::Tensor output = at::detail::empty_generic(sizes, &OutputBlockCache::instance(),
                                                c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                options.dtype().toScalarType(), std::nullopt);
  // A cached block holds an earlier tensor's values: poison it as at::empty would in deterministic mode.
  if (at::globalContext().deterministicAlgorithms() && at::globalContext().deterministicFillUninitializedMemory()) {
    at::native::fill_empty_deterministic_(output);
  }
  return output;
}

// ---------------------------------------------------------------------------------------------------------
// Step layouts. A step tensor holds one row of width W per (direction, step, batch row): padded [D, T, B, W]
// holds every row, padded or not; packed [D, N, W] holds only the N = sum(lengths) rows that run, step after
// step in PackedSequence's data order, whose rows are sorted by length so that the rows running at step t are
// the first batch_sizes[t]. In both, row b of step t of direction d is row first_row(d, t) + b.

struct StepLayout {
  int64_t D, T, B;
  const int64_t* lengths;  // [B]; nullptr: every row runs every step
  bool padded;             // rows that do not run at a step still exist there, and are written as 0
  int64_t direction_rows;  // rows of one direction: T * B padded, N packed
  std::vector<int64_t> step_begin;  // [T + 1]: the first row of each step within a direction, then direction_rows

  int64_t first_row(int64_t direction, int64_t step) const {
    return direction * direction_rows + step_begin[step];
  }
  bool runs(int64_t row, int64_t step) const { return lengths == nullptr || step < lengths[row]; }
  int64_t row_steps(int64_t row) const { return lengths == nullptr ? T : lengths[row]; }
};

StepLayout padded_layout(int64_t D, int64_t T, int64_t B, const int64_t* lengths) {
  StepLayout layout{D, T, B, lengths, true, T * B, std::vector<int64_t>(T + 1)};
  for (int64_t t = 0; t <= T; ++t) {
    layout.step_begin[t] = t * B;
  }
  return layout;
}

// `lengths` receives each row's length, which batch_sizes implies.
StepLayout packed_layout(int64_t D, const at::Tensor& batch_sizes, std::vector<int64_t>& lengths) {
  const int64_t T = batch_sizes.numel(), B = batch_sizes.data_ptr<int64_t>()[0];
  const int64_t* sizes = batch_sizes.data_ptr<int64_t>();
  lengths.assign(B, 0);
  StepLayout layout{D, T, B, lengths.data(), false, 0, std::vector<int64_t>(T + 1)};
  int64_t tokens = 0;
  for (int64_t t = 0; t < T; ++t) {
    layout.step_begin[t] = tokens;
    tokens += sizes[t];
    const int64_t next = t + 1 < T ? sizes[t + 1] : 0;
    for (int64_t b = next; b < sizes[t]; ++b) {
      lengths[b] = t + 1;  // rows [next, sizes[t]) run their last step at t
    }
  }
  layout.step_begin[T] = layout.direction_rows = tokens;
  return layout;
}

// Calls body(begin, end, runs) over the rows [begin, end) cut into runs of at most kRowsPerSubBlock rows that all
// run step t (runs == true) or all skip it. With rows sorted by length the rows that run are one prefix.
template <typename Body>
RNN_FAST_INLINE void for_each_run(const StepLayout& layout, int64_t step, int64_t begin, int64_t end,
                                  const Body& body) {
  for (int64_t b = begin; b < end;) {
    const bool runs = layout.runs(b, step);
    const int64_t limit = std::min(end, b + kRowsPerSubBlock);
    int64_t stop = b + 1;
    while (stop < limit && layout.runs(stop, step) == runs) {
      ++stop;
    }
    body(b, stop, runs);
    b = stop;
  }
}

// ---------------------------------------------------------------------------------------------------------
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
    for (int64_t j = 0; j < H; ++j) {
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
    for (int64_t j = 0; j < H; ++j) {
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

RNN_FAST_TARGET_CLONES void forward_cells_vectorised(const ForwardStep<float>& s) { forward_cells<true>(s); }
RNN_FAST_TARGET_CLONES void forward_cells_vectorised(const ForwardStep<double>& s) { forward_cells<true>(s); }
RNN_FAST_TARGET_CLONES void inference_cells_vectorised(const ForwardStep<float>& s) { forward_cells<false>(s); }
RNN_FAST_TARGET_CLONES void inference_cells_vectorised(const ForwardStep<double>& s) { forward_cells<false>(s); }
RNN_FAST_TARGET_CLONES void backward_cells_vectorised(const BackwardStep<float>& s) { backward_cells(s); }
RNN_FAST_TARGET_CLONES void backward_cells_vectorised(const BackwardStep<double>& s) { backward_cells(s); }

template <typename scalar_t>
void zero_rows(scalar_t* rows, int64_t count, int64_t width) {
  std::fill(rows, rows + count * width, scalar_t(0));
}

// ---------------------------------------------------------------------------------------------------------
// Work partition: each thread owns (direction, block of rows) pairs for all T steps and never waits for another.

struct RowBlock {
  int64_t direction, begin, end;
};

// About threads / D contiguous blocks of rows per direction, each with about the same number of row-steps to
// run. Equal numbers of rows would not do: in packed order the rows are sorted by length, and the thread of the
// short rows would sit idle once they end.
std::vector<RowBlock> row_blocks(const StepLayout& layout, int64_t threads) {
  const int64_t B = layout.B;
  const int64_t wanted = std::min(B, std::max<int64_t>(1, (threads + layout.D - 1) / layout.D));
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) {
    total += layout.row_steps(b);
  }
  std::vector<std::pair<int64_t, int64_t>> ranges;
  int64_t begin = 0, done = 0;
  for (int64_t k = 1; k <= wanted && begin < B; ++k) {
    // The k-th share of the row-steps, in integers that cannot overflow (total <= T * B < 2^62).
    const int64_t target = total / wanted * k + total % wanted * k / wanted;
    int64_t end = begin;
    while (end < B && (end == begin || done < target || k == wanted)) {
      done += layout.row_steps(end);
      ++end;
    }
    ranges.emplace_back(begin, end);
    begin = end;
  }
  std::vector<RowBlock> blocks;
  for (int64_t d = 0; d < layout.D; ++d) {
    for (const auto& [first, last] : ranges) {
      blocks.push_back({d, first, last});
    }
  }
  return blocks;
}

// Keeps MKL on the calling thread while it lives. Called outside a parallel region, MKL would split each small
// per-step GEMM over its own threads: a fork and a join per step, which costs more than the GEMM, and far more
// on a busy machine. Inside a parallel region it stays on one thread anyway.
class SequentialBlas {
 public:
  SequentialBlas() {
    if (mkl_set_num_threads_local_ != nullptr) {
      const int one = 1;
      previous_ = mkl_set_num_threads_local_(&one);
    }
  }
  ~SequentialBlas() {
    if (mkl_set_num_threads_local_ != nullptr) {
      mkl_set_num_threads_local_(&previous_);
    }
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  int previous_ = 0;  // 0: MKL's global setting
};

// Runs body(RowBlock) for every block, each on one thread; without an OpenMP region when one thread does all.
template <typename Body>
void for_each_row_block(const StepLayout& layout, const Body& body) {
  const int64_t threads = at::get_num_threads();
  const std::vector<RowBlock> blocks = row_blocks(layout, threads);
  const int64_t num_blocks = static_cast<int64_t>(blocks.size());
  const int64_t team = std::min(threads, num_blocks);
  if (team <= 1) {
    const SequentialBlas sequential;
    for (const RowBlock& block : blocks) {
      body(block);
    }
    return;
  }
#pragma omp parallel for num_threads(team) schedule(static, 1)
  for (int64_t index = 0; index < num_blocks; ++index) {
    body(blocks[index]);
  }
}

// Per-thread buffers of at least `count` elements, kept across calls: slot 0 for the inference pass's
// pre-activations, slot 1 for the chunks of xw the whole-stack inference projects.
template <typename scalar_t>
scalar_t* thread_scratch(size_t count, int slot = 0) {
  thread_local std::array<std::vector<scalar_t>, 2> buffers;
  std::vector<scalar_t>& buffer = buffers[slot];
  if (buffer.size() < count) {
    buffer.resize(count);
  }
  return buffer.data();
}

// ---------------------------------------------------------------------------------------------------------
// The recurrence, in either layout. Per step and per run of rows it runs one single-threaded BLAS GEMM
// (xw_t + h_{t-1} @ W_hh^T forward, grad_pre @ W_hh backward) and one vectorised elementwise pass over the rows
// the GEMM wrote or will read, while they are in cache. Rows that do not run a step cost nothing but, in the
// padded layout, writing their zeros.

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

template <typename scalar_t>
void run_forward(const StepLayout& layout, int64_t H, const ForwardTensors<scalar_t>& out) {
  const int64_t G = 4 * H;
  for_each_row_block(layout, [&](RowBlock block) {
    const auto accumulate_gates = gates_gemm(out.w_hh[block.direction], H, layout.T, block.end - block.begin);
    scalar_t* scratch = out.gates != nullptr
                            ? nullptr
                            : thread_scratch<scalar_t>(std::min(kRowsPerSubBlock, block.end - block.begin) * G);
    forward_steps(layout, H, out, block, accumulate_gates, scratch, 0, layout.T);
  });
}

template <typename scalar_t>
struct BackwardTensors {
  const scalar_t* grad_y;
  const scalar_t* w_hh;
  const scalar_t* c0;
  const scalar_t* gates;
  const scalar_t* cell;
  scalar_t* grad_xw;
  scalar_t* dh;  // [D, B, H] running dL/dh, grad_h_n in, grad_h0 out
  scalar_t* dc;  // [D, B, H] running dL/dc, grad_c_n in, grad_c0 out
};

template <typename scalar_t>
void run_backward(const StepLayout& layout, int64_t H, const BackwardTensors<scalar_t>& out) {
  const int64_t T = layout.T, B = layout.B, G = 4 * H;
  for_each_row_block(layout, [&](RowBlock block) {
    const int64_t d = block.direction;
    const auto accumulate_hidden_grad = hidden_grad_gemm(out.w_hh + d * G * H, H, T, block.end - block.begin);
    const int64_t first_step = d == 0 ? 0 : T - 1;
    // Steps in reverse processing order: direction 0 goes t = T-1 .. 0, direction 1 goes t = 0 .. T-1.
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = d == 0 ? T - 1 - s : s;
      const int64_t step_row = layout.first_row(d, t);
      // The previous processed step in the forward pass; a row that runs t ran it too, unless t is the row's
      // first step (backward_cells then reads c0).
      const int64_t prev_row = t == first_step ? -1 : layout.first_row(d, d == 0 ? t - 1 : t + 1);
      for_each_run(layout, t, block.begin, block.end, [&](int64_t b, int64_t end, bool runs) {
        const int64_t rows = end - b, row = step_row + b, state_row = d * B + b;
        if (!runs) {
          // The state passes through a padded step untouched.
          if (layout.padded) {
            zero_rows(out.grad_xw + row * G, rows, G);
          }
          return;
        }
        backward_cells_vectorised(BackwardStep<scalar_t>{
            out.grad_y + row * H, out.gates + row * G, out.cell + row * H,
            prev_row < 0 ? nullptr : out.cell + (prev_row + b) * H, out.c0 + state_row * H, out.grad_xw + row * G,
            out.dh + state_row * H, out.dc + state_row * H, layout.lengths == nullptr ? nullptr : layout.lengths + b,
            t, first_step, rows, H, d == 1});
        accumulate_hidden_grad(out.grad_xw + row * G, G, out.dh + state_row * H, H, rows);
      });
    }
  });
}
// ---------------------------------------------------------------------------------------------------------
// What the op boundary checks beyond the contract's shapes and dtypes (recurrence_checks.h).

void check_supported_dtype(at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "the CPU backend supports float32 and float64, got ",
              dtype);
}

// The kernels trust lengths to lie in [1, T]; on the CPU they can be read without a device sync.
void check_length_values(const std::optional<at::Tensor>& lengths, int64_t seq_len) {
  if (!lengths.has_value()) {
    return;
  }
  const int64_t* data = lengths->data_ptr<int64_t>();
  for (int64_t b = 0; b < lengths->numel(); ++b) {
    TORCH_CHECK(data[b] >= 1 && data[b] <= seq_len, "lengths must lie in [1, T] = [1, ", seq_len,
                "], got lengths[", b, "] = ", data[b]);
  }
}

const int64_t* lengths_data(const std::optional<at::Tensor>& lengths) {
  return lengths.has_value() ? lengths->data_ptr<int64_t>() : nullptr;
}

// The packed layout's sizes: D directions, N rows per direction, B = batch_sizes[0], H hidden units, T steps.
struct PackedSizes {
  int64_t D, N, B, H, T;
};

// batch_sizes is PackedSequence's: a CPU int64 [T], each in [1, B], non-increasing. `steps` is a CPU float32 or
// float64 [D, N, W] with N = sum(batch_sizes) and W = width_per_hidden * H.
PackedSizes check_packed_steps(const at::Tensor& steps, const char* name, int64_t width_per_hidden,
                               const at::Tensor& batch_sizes) {
  check_supported_dtype(steps.scalar_type());
  TORCH_CHECK(steps.device().is_cpu(), name, " must be a CPU tensor, got one on ", steps.device());
  TORCH_CHECK(steps.dim() == 3, name, " must have shape (D, N, ", width_per_hidden == 4 ? "4H" : "H", "), got ",
              steps.sizes());
  TORCH_CHECK(batch_sizes.dim() == 1 && batch_sizes.numel() >= 1,
              "batch_sizes must have shape (T) with T >= 1, got ", batch_sizes.sizes());
  TORCH_CHECK(batch_sizes.device().is_cpu() && batch_sizes.scalar_type() == at::kLong,
              "batch_sizes must be a CPU int64 tensor (PackedSequence's), got ", batch_sizes.scalar_type(), " on ",
              batch_sizes.device());
  TORCH_CHECK(batch_sizes.is_contiguous(), "batch_sizes must be contiguous");
  const int64_t D = steps.size(0), N = steps.size(1), W = steps.size(2), T = batch_sizes.numel();
  TORCH_CHECK(D == 1 || D == 2, "the number of directions (dimension 0 of ", name, ") must be 1 or 2, got ", D);
  TORCH_CHECK(W % width_per_hidden == 0 && W > 0, "the last dimension of ", name, " must be ", width_per_hidden,
              " * hidden_size, got ", W);
  const int64_t* sizes = batch_sizes.data_ptr<int64_t>();
  int64_t tokens = 0;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(sizes[t] >= 1 && sizes[t] <= sizes[0] && (t == 0 || sizes[t] <= sizes[t - 1]),
                "batch_sizes must be positive and non-increasing, got batch_sizes[", t, "] = ", sizes[t]);
    tokens += sizes[t];
  }
  TORCH_CHECK(N == tokens, "dimension 1 of ", name, " must be sum(batch_sizes) = ", tokens, ", got ", N);
  constexpr int64_t kMaxSize = std::numeric_limits<int>::max();
  TORCH_CHECK(D * N <= kMaxSize && W <= kMaxSize, "the sizes of ", name, " must fit in int32, got ", steps.sizes());
  return {D, N, sizes[0], W / width_per_hidden, T};
}

PackedSizes check_packed_forward_inputs(const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0,
                                        const at::Tensor& c0, const at::Tensor& batch_sizes) {
  const PackedSizes sizes = check_packed_steps(xw, "xw", 4, batch_sizes);
  const auto [D, N, B, H, T] = sizes;
  const at::ScalarType dtype = xw.scalar_type();
  RNN_FAST_CHECK_INPUT(xw, xw.device(), dtype, D, N, 4 * H);
  RNN_FAST_CHECK_INPUT(w_hh, xw.device(), dtype, D, 4 * H, H);
  RNN_FAST_CHECK_INPUT(h0, xw.device(), dtype, D, B, H);
  RNN_FAST_CHECK_INPUT(c0, xw.device(), dtype, D, B, H);
  return sizes;
}

// ---------------------------------------------------------------------------------------------------------
// The ops. Each builds its layout and its outputs, then runs the one forward or backward above.

// y [*, H] for xw [*, 4H]; h_n, c_n start as h0, c0 and are updated in place; gates and cell only when saving.
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
  DISPATCH_FLOAT_AND_DOUBLE(xw.scalar_type(), "lstm_recurrence_forward", [&] {
    const scalar_t* w = w_hh.data_ptr<scalar_t>();
    run_forward(layout, H, ForwardTensors<scalar_t>{
        xw.data_ptr<scalar_t>(), {w, w + (layout.D - 1) * G * H}, y.data_ptr<scalar_t>(),
        layout.direction_rows * H, H, h_n.data_ptr<scalar_t>(), c_n.data_ptr<scalar_t>(),
        save ? gates.data_ptr<scalar_t>() : nullptr, save ? cell.data_ptr<scalar_t>() : nullptr});
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
  DISPATCH_FLOAT_AND_DOUBLE(w_hh.scalar_type(), "lstm_recurrence_backward", [&] {
    run_backward(layout, w_hh.size(2), BackwardTensors<scalar_t>{
        grad_y.data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(),
        gates.data_ptr<scalar_t>(), cell.data_ptr<scalar_t>(), grad_xw.data_ptr<scalar_t>(),
        grad_h0.data_ptr<scalar_t>(), grad_c0.data_ptr<scalar_t>()});
  });
  return {grad_xw, grad_h0, grad_c0};
}

StepLayout checked_padded_layout(const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0,
                                 const at::Tensor& c0, const std::optional<at::Tensor>& lengths) {
  check_supported_dtype(xw.scalar_type());
  const auto sizes = rnn_fast::check_forward_inputs(xw, w_hh, h0, c0, lengths);
  check_length_values(lengths, sizes.T);
  return padded_layout(sizes.D, sizes.T, sizes.B, lengths_data(lengths));
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
  check_supported_dtype(w_hh.scalar_type());
  const auto sizes = rnn_fast::check_backward_inputs(grad_y, grad_h_n, grad_c_n, w_hh, c0, gates, cell, lengths);
  check_length_values(lengths, sizes.T);
  return backward_outputs(padded_layout(sizes.D, sizes.T, sizes.B, lengths_data(lengths)), grad_y, grad_h_n,
                          grad_c_n, w_hh, c0, gates, cell);
}

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
  const at::ScalarType dtype = w_hh.scalar_type();
  check_supported_dtype(dtype);
  const at::Device device = gates.device();
  RNN_FAST_CHECK_INPUT(grad_y, device, dtype, D, N, H);
  RNN_FAST_CHECK_INPUT(grad_h_n, device, dtype, D, B, H);
  RNN_FAST_CHECK_INPUT(grad_c_n, device, dtype, D, B, H);
  RNN_FAST_CHECK_INPUT(w_hh, device, dtype, D, 4 * H, H);
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
// ---------------------------------------------------------------------------------------------------------
// The input projection of a layer, xw[d] = bias[d] + sum_p parts[p] @ w_ih[d][:, p*K:(p+1)*K]^T, with xw from
// the output block cache: freshly mapped, xw's page faults cost as much as a recurrence op's elementwise work.
// A layer's input comes in parts [P, T, B, K], read where they lie: the layer input itself (P = 1), possibly a
// batch-first tensor seen time-major, or the previous layer's y [D, T, B, H] (P = D). So neither pass copies
// the input into a time-major matrix or interleaves the directions into [T, B, D*H].

void check_projection(const at::Tensor& parts, const at::Tensor& w_ih) {
  TORCH_CHECK(parts.dim() == 4, "parts must have shape (P, T, B, K), got ", parts.sizes());
  TORCH_CHECK(w_ih.dim() == 3, "w_ih must have shape (D, 4H, P*K), got ", w_ih.sizes());
  const int64_t P = parts.size(0), K = parts.size(3), D = w_ih.size(0), G = w_ih.size(1);
  const auto dtype = parts.scalar_type();
  check_supported_dtype(dtype);
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

// Below this many multiply-adds a projection runs on the calling thread: MKL's fork and join would cost more.
constexpr int64_t kSequentialProjectionMacs = int64_t(1) << 21;

// parts [P, T, B, K] as memory: element strides between parts, steps and batch rows, unit stride along K.
template <typename scalar_t>
struct PartsView {
  const scalar_t* data;
  int64_t P, T, B, K, part_stride, step_stride, row_stride;
};

template <typename scalar_t>
PartsView<scalar_t> parts_view(const at::Tensor& parts) {
  return {parts.data_ptr<scalar_t>(), parts.size(0),   parts.size(1),  parts.size(2),
          parts.size(3),              parts.stride(0), parts.stride(1), parts.stride(2)};
}

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
template <typename scalar_t, typename PartGemm>
void project_parts(const PartsView<scalar_t>& parts, std::array<const scalar_t*, 2> bias, scalar_t* xw,
                   int64_t xw_direction_stride, int64_t D, int64_t G, bool may_thread, const PartGemm& part_gemm) {
  const std::vector<ProjectionBlock> blocks = projection_blocks(parts, G);
  const int64_t num_tasks = D * static_cast<int64_t>(blocks.size());
  auto project = [&](int64_t task) {
    const int64_t d = task / static_cast<int64_t>(blocks.size());
    const ProjectionBlock& block = blocks[task % blocks.size()];
    scalar_t* out = xw + d * xw_direction_stride + block.output;
    for (int64_t row = 0; row < block.rows; ++row) {
      scalar_t* out_row = out + row * block.output_ld;
      if (bias[d] == nullptr) {
        std::fill(out_row, out_row + G, scalar_t(0));
      } else {
        std::copy(bias[d], bias[d] + G, out_row);
      }
    }
    for (int64_t p = 0; p < parts.P; ++p) {
      part_gemm(d, p, parts.data + p * parts.part_stride + block.input, block.input_ld, out, block.output_ld,
                block.rows);
    }
  };
  const int64_t threads = may_thread ? at::get_num_threads() : 1;
  const bool small = D * parts.T * parts.B * parts.P * parts.K * G < kSequentialProjectionMacs;
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

void check_projection_sizes(const at::Tensor& parts, int64_t G) {
  constexpr int64_t kMaxSize = std::numeric_limits<int>::max();
  const int64_t T = parts.size(1), B = parts.size(2);
  TORCH_CHECK(T * B <= kMaxSize && parts.stride(1) <= kMaxSize && parts.stride(2) <= kMaxSize &&
                  parts.size(0) * parts.size(3) <= kMaxSize && B * G <= kMaxSize,
              "the sizes of parts must fit in int32, got ", parts.sizes(), " with strides ", parts.strides());
}

at::Tensor input_projection_cpu(const at::Tensor& parts, const at::Tensor& w_ih, const std::optional<at::Tensor>& bias) {
  check_projection(parts, w_ih);
  const int64_t P = parts.size(0), T = parts.size(1), B = parts.size(2), K = parts.size(3);
  const int64_t D = w_ih.size(0), G = w_ih.size(1);
  if (bias.has_value()) {
    RNN_FAST_CHECK_INPUT((*bias), parts.device(), parts.scalar_type(), D, G);
  }
  check_projection_sizes(parts, G);
  auto xw = empty_output({D, T, B, G}, parts.options());
  DISPATCH_FLOAT_AND_DOUBLE(parts.scalar_type(), "cpu_input_projection", [&] {
    const scalar_t* w = w_ih.data_ptr<scalar_t>();
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    project_parts(parts_view<scalar_t>(parts), {b, b == nullptr ? nullptr : b + (D - 1) * G}, xw.data_ptr<scalar_t>(),
                  T * B * G, D, G, true,
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

// ---------------------------------------------------------------------------------------------------------
// Inference through a whole stack of layers in one op (rnn_fast::cpu_lstm_inference): nn.RNNBase's parameters read
// where they lie (no stacked copies), no Python between layers, each layer's final state written straight into
// h_n and c_n. Each thread projects its own block of rows a chunk of steps at a time, just before it runs them, so
// no layer's whole xw exists (nn.LSTM's peak memory or less) and each chunk stays in cache. A unidirectional stack of
// a few batch rows, whose one block per layer would leave the other threads idle, runs its layers at once: layer l
// takes a chunk of steps as soon as layer l-1 has finished it.

constexpr int64_t kPipelineMaxRows = 16;   // batch rows up to which the layers of a stack run at once
constexpr int64_t kPipelineSteps = 8;      // steps per chunk there: the lag between one layer and the next
constexpr int64_t kChunkBytes = 1 << 20;   // otherwise, a block's chunk of xw: within L2 with the weights

template <typename scalar_t>
struct StackLayer {
  PartsView<scalar_t> input;
  std::array<const scalar_t*, 2> w_ih;
  std::array<std::vector<scalar_t>, 2> bias;  // b_ih + b_hh of each direction, empty without biases
  ForwardTensors<scalar_t> recurrence;        // xw unused: chunks of it come from project_chunk
};

// The input projection of one direction of a layer for one thread's block of rows, a GEMM per part of its input.
template <typename scalar_t>
struct ChunkProjection {
  std::vector<FixedWeightGemm<scalar_t>> parts;

  // slot: the first of the parts' packed-weight slots.
  ChunkProjection(const StackLayer<scalar_t>& layer, int64_t direction, int64_t G, int64_t calls, int64_t rows,
                  int slot) {
    const int64_t P = layer.input.P, K = layer.input.K;
    for (int64_t p = 0; p < P; ++p) {
      parts.emplace_back(layer.w_ih[direction] + p * K, G, K, P * K, true, calls, rows, slot + static_cast<int>(p));
    }
  }
};

// Projects the rows of `block` for the processing steps [first, last) of its direction into a chunk buffer.
template <typename scalar_t>
XwChunk<scalar_t> project_chunk(const StackLayer<scalar_t>& layer, const ChunkProjection<scalar_t>& projection,
                                const StepLayout& layout, RowBlock block, int64_t first, int64_t last,
                                scalar_t* buffer, int64_t G) {
  const int64_t d = block.direction, rows = block.end - block.begin;
  const int64_t first_time = d == 0 ? first : layout.T - last, last_time = d == 0 ? last : layout.T - first;
  const std::array<const scalar_t*, 2> bias{layer.bias[d].empty() ? nullptr : layer.bias[d].data(), nullptr};
  auto part_gemm = [&](int64_t, int64_t p, const scalar_t* in, int64_t in_ld, scalar_t* out, int64_t out_ld,
                       int64_t n) { projection.parts[p](in, in_ld, out, out_ld, n); };
  PartsView<scalar_t> view = layer.input;
  if (layout.padded) {
    // Times [first_time, last_time) of the block's rows: one GEMM when they follow each other, else one per step.
    view.data += first_time * view.step_stride + block.begin * view.row_stride;
    view.T = last_time - first_time;
    view.B = rows;
    project_parts(view, bias, buffer, 0, 1, G, false, part_gemm);
  } else {
    // One GEMM per step over the block's rows that run it (a prefix: rows are sorted by length).
    for (int64_t t = first_time; t < last_time; ++t) {
      const int64_t running = std::min(block.end, layout.step_begin[t + 1] - layout.step_begin[t]) - block.begin;
      if (running > 0) {
        PartsView<scalar_t> step = view;
        step.data += (layout.step_begin[t] + block.begin) * view.row_stride;
        step.B = running;
        project_parts(step, bias, buffer + (t - first_time) * rows * G, 0, 1, G, false, part_gemm);
      }
    }
  }
  return {buffer, first_time, rows};
}

// How many steps of a layer are done, for the layer above to wait on: a short spin, then asleep in the kernel
// (futex) rather than spinning or yielding. On a busy machine the layer below may have been descheduled; a spinning
// waiter would keep the core it could run on, and every chunk would cost a scheduler time slice.
class StepProgress {
 public:
  void publish(int32_t steps) {
    steps_.store(steps, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      wake();
    }
  }

  void wait_for(int32_t steps) {
    for (int spins = 0; spins < kSpins; ++spins) {
      if (steps_.load(std::memory_order_acquire) >= steps) {
        return;
      }
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
    }
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    for (int32_t seen = steps_.load(std::memory_order_seq_cst); seen < steps;
         seen = steps_.load(std::memory_order_seq_cst)) {
      sleep_while(seen);
    }
    sleepers_.fetch_sub(1, std::memory_order_seq_cst);
  }

 private:
  static constexpr int kSpins = 2000;  // about 20 us of pause instructions

  void sleep_while(int32_t seen) {
#if defined(__linux__)
    // Returns at once if the count is no longer `seen`, so a publish between the load and the call is not lost.
    syscall(SYS_futex, reinterpret_cast<int32_t*>(&steps_), FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
#else
    (void)seen;
    std::this_thread::yield();
#endif
  }

  void wake() {
#if defined(__linux__)
    syscall(SYS_futex, reinterpret_cast<int32_t*>(&steps_), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
#endif
  }

  std::atomic<int32_t> steps_{0};
  std::atomic<int32_t> sleepers_{0};
  static_assert(sizeof(std::atomic<int32_t>) == sizeof(int32_t), "futex needs a plain 32-bit word");
};

// One layer, its blocks of rows on the threads, each running chunk after chunk.
template <typename scalar_t>
void run_layer_in_chunks(const StackLayer<scalar_t>& layer, const StepLayout& layout, int64_t H) {
  const int64_t G = 4 * H;
  for_each_row_block(layout, [&](RowBlock block) {
    const int64_t rows = block.end - block.begin;
    const int64_t steps = std::max<int64_t>(1, kChunkBytes / (rows * G * static_cast<int64_t>(sizeof(scalar_t))));
    const auto gemm = gates_gemm(layer.recurrence.w_hh[block.direction], H, layout.T, rows);
    // How many GEMMs the chunks' projections make, for deciding whether packing w_ih repays itself.
    const int64_t chunks = (layout.T + steps - 1) / steps;
    PartsView<scalar_t> chunk_view = layer.input;
    chunk_view.T = std::min(steps, layout.T);
    chunk_view.B = rows;
    const int64_t calls =
        chunks * (layout.padded ? static_cast<int64_t>(projection_blocks(chunk_view, G).size()) : chunk_view.T);
    const ChunkProjection<scalar_t> projection(layer, block.direction, G, calls, rows, 1);
    scalar_t* buffer = thread_scratch<scalar_t>(steps * rows * G, 1);
    for (int64_t first = 0; first < layout.T; first += steps) {
      const int64_t last = std::min(layout.T, first + steps);
      forward_steps(layout, H, layer.recurrence, block, gemm, static_cast<scalar_t*>(nullptr), first, last,
                    project_chunk(layer, projection, layout, block, first, last, buffer, G));
    }
  });
}

// All layers at once, thread k running layers k, k + team, ...: in each chunk of steps a thread runs its layers in
// order, so it never waits for itself, and layer l waits only until layer l-1 has finished the chunk.
template <typename scalar_t>
void run_layers_at_once(const std::vector<StackLayer<scalar_t>>& layers, const StepLayout& layout, int64_t H) {
  const int64_t L = static_cast<int64_t>(layers.size()), G = 4 * H, B = layout.B;
  std::unique_ptr<StepProgress[]> done(new StepProgress[L]);
#pragma omp parallel num_threads(std::min<int64_t>(at::get_num_threads(), L))
  {
    const int64_t team = omp_get_num_threads(), rank = omp_get_thread_num();
    const SequentialBlas sequential;
    // Each of this thread's layers packs its w_hh and w_ih (one part: unidirectional) in slots of their own.
    std::vector<FixedWeightGemm<scalar_t>> gemms;
    std::vector<ChunkProjection<scalar_t>> projections;
    for (int64_t l = rank; l < L; l += team) {
      const int slot = 2 * static_cast<int>(gemms.size());
      gemms.push_back(gates_gemm(layers[l].recurrence.w_hh[0], H, layout.T, B, slot));
      projections.emplace_back(layers[l], 0, G, layout.T, B, slot + 1);
    }
    scalar_t* buffer = thread_scratch<scalar_t>(kPipelineSteps * B * G, 1);
    for (int64_t first = 0; first < layout.T; first += kPipelineSteps) {
      const int64_t last = std::min(layout.T, first + kPipelineSteps);
      for (int64_t l = rank, own = 0; l < L; l += team, ++own) {
        if (l > 0) {
          done[l - 1].wait_for(static_cast<int32_t>(last));
        }
        const RowBlock all_rows{0, 0, B};
        forward_steps(layout, H, layers[l].recurrence, all_rows, gemms[own], static_cast<scalar_t*>(nullptr), first,
                      last,
                      project_chunk(layers[l], projections[own], layout, all_rows, first, last, buffer, G));
        done[l].publish(static_cast<int32_t>(last));
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_inference_cpu(const at::Tensor& input, const at::Tensor& h0,
                                                                  const at::Tensor& c0, at::TensorList params,
                                                                  bool has_biases, int64_t num_layers,
                                                                  bool bidirectional,
                                                                  const std::optional<at::Tensor>& batch_sizes) {
  const int64_t D = bidirectional ? 2 : 1, L = num_layers, per_direction = has_biases ? 4 : 2;
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(params.size()) == L * D * per_direction, "params must hold ",
              L * D * per_direction, " tensors (w_ih, w_hh", has_biases ? ", b_ih, b_hh" : "",
              " of each layer and direction, nn.RNNBase's _flat_weights), got ", params.size());
  TORCH_CHECK(params[1].dim() == 2 && params[1].size(0) == 4 * params[1].size(1) && params[1].size(1) > 0,
              "w_hh must have shape (4H, H), got ", params[1].sizes());
  const int64_t H = params[1].size(1), G = 4 * H, I = input.size(-1);
  std::vector<int64_t> lengths;
  StepLayout layout;
  if (batch_sizes.has_value()) {
    TORCH_CHECK(input.dim() == 2, "packed input must have shape (N, I), got ", input.sizes());
    check_packed_steps(input.unsqueeze(0), "input", 1, *batch_sizes);
    layout = packed_layout(D, *batch_sizes, lengths);
  } else {
    TORCH_CHECK(input.dim() == 3 && input.size(0) >= 1, "input must have shape (T, B, I) with T >= 1, got ",
                input.sizes());
    check_supported_dtype(input.scalar_type());
    TORCH_CHECK(input.device().is_cpu(), "input must be a CPU tensor, got one on ", input.device());
    layout = padded_layout(D, input.size(0), input.size(1), nullptr);
  }
  const at::Tensor x = input.stride(-1) == 1 ? input : input.contiguous();
  const auto device = x.device();
  const auto dtype = x.scalar_type();
  const int64_t B = layout.B, rows = layout.direction_rows;
  RNN_FAST_CHECK_INPUT(h0, device, dtype, L * D, B, H);
  RNN_FAST_CHECK_INPUT(c0, device, dtype, L * D, B, H);
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t d = 0; d < D; ++d) {
      const at::Tensor* p = params.data() + (l * D + d) * per_direction;
      const at::Tensor &w_ih = p[0], &w_hh = p[1];
      RNN_FAST_CHECK_INPUT(w_ih, device, dtype, G, l == 0 ? I : D * H);
      RNN_FAST_CHECK_INPUT(w_hh, device, dtype, G, H);
      if (has_biases) {
        const at::Tensor &b_ih = p[2], &b_hh = p[3];
        RNN_FAST_CHECK_INPUT(b_ih, device, dtype, G);
        RNN_FAST_CHECK_INPUT(b_hh, device, dtype, G);
      }
    }
  }
  check_projection_sizes(batch_sizes.has_value() ? x.view({1, 1, rows, I}) : x.unsqueeze(0), G);

  auto output = batch_sizes.has_value() ? empty_output({rows, D * H}, x.options())
                                        : empty_output({layout.T, B, D * H}, x.options());
  // The running state of every layer, updated in place step after step.
  auto h_n = h0.clone();
  auto c_n = c0.clone();
  const bool at_once = D == 1 && L >= 2 && at::get_num_threads() >= 2 &&
                       B <= kPipelineMaxRows && layout.T >= 2 * kPipelineSteps;
  DISPATCH_FLOAT_AND_DOUBLE(dtype, "cpu_lstm_inference", [&] {
    std::vector<StackLayer<scalar_t>> layers(L);
    std::vector<at::Tensor> outputs;  // y [D, rows, H] of the layers below the last
    PartsView<scalar_t> parts = batch_sizes.has_value()
                                    ? PartsView<scalar_t>{x.data_ptr<scalar_t>(), 1, 1, rows, I, 0, 0, x.stride(0)}
                                    : PartsView<scalar_t>{x.data_ptr<scalar_t>(), 1, layout.T, B, I, 0, x.stride(0),
                                                          x.stride(1)};
    for (int64_t l = 0; l < L; ++l) {
      StackLayer<scalar_t>& layer = layers[l];
      layer.input = parts;
      std::array<const scalar_t*, 2> w_hh{};
      for (int64_t d = 0; d < D; ++d) {
        const at::Tensor* p = params.data() + (l * D + d) * per_direction;
        layer.w_ih[d] = p[0].data_ptr<scalar_t>();
        w_hh[d] = p[1].data_ptr<scalar_t>();
        if (has_biases) {
          const scalar_t* b_ih = p[2].data_ptr<scalar_t>();
          const scalar_t* b_hh = p[3].data_ptr<scalar_t>();
          for (int64_t j = 0; j < G; ++j) {
            layer.bias[d].push_back(b_ih[j] + b_hh[j]);
          }
        }
      }
      const bool last = l == L - 1;
      if (!last) {
        outputs.push_back(empty_output({D, rows, H}, x.options()));
      }
      scalar_t* y = last ? output.data_ptr<scalar_t>() : outputs.back().data_ptr<scalar_t>();
      // The last layer writes the output [rows, D*H] (directions side by side), the others y [D, rows, H].
      layer.recurrence = ForwardTensors<scalar_t>{nullptr, w_hh, y, last ? H : rows * H, last ? D * H : H,
                                                  h_n.data_ptr<scalar_t>() + l * D * B * H,
                                                  c_n.data_ptr<scalar_t>() + l * D * B * H, nullptr, nullptr};
      // The next layer's parts: this layer's y [D, T, B, H] (padded) or [D, 1, N, H] (packed).
      parts = layout.padded ? PartsView<scalar_t>{y, D, layout.T, B, H, rows * H, B * H, H}
                            : PartsView<scalar_t>{y, D, 1, rows, H, rows * H, 0, H};
      if (!at_once) {
        run_layer_in_chunks(layer, layout, H);
        if (outputs.size() > 1) {
          outputs.front() = at::Tensor();  // the layer below this one's input: read by now
          outputs.erase(outputs.begin());
        }
      }
    }
    if (at_once) {
      run_layers_at_once(layers, layout, H);
    }
  });
  return {output, h_n, c_n};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rnn_fast, m) {
  // Side effect only (returns the bytes given back): call it eagerly, outside torch.compile.
  m.def("cpu_release_cached_blocks() -> int", [] { return OutputBlockCache::instance().release_unused(); });
  m.def("cpu_input_projection(Tensor parts, Tensor w_ih, Tensor? bias) -> Tensor xw");
  m.def(
      "cpu_input_projection_backward(Tensor grad_xw, Tensor parts, Tensor w_ih, bool[3] output_mask)"
      " -> (Tensor grad_parts, Tensor grad_w_ih, Tensor grad_bias)");
  m.def("cpu_packed_recurrent_weight_grad(Tensor grad_xw, Tensor y, Tensor h0, Tensor batch_sizes) -> Tensor");
  // Inference through all layers at once; params as nn.RNNBase's _flat_weights, input [T, B, I] (any strides with
  // a dense last dimension) or PackedSequence data [N, I] with its batch_sizes.
  m.def(
      "cpu_lstm_inference(Tensor input, Tensor h0, Tensor c0, Tensor[] params, bool has_biases, int num_layers,"
      " bool bidirectional, Tensor? batch_sizes) -> (Tensor output, Tensor h_n, Tensor c_n)");
}

TORCH_LIBRARY_IMPL(rnn_fast, CPU, m) {
  m.impl("lstm_recurrence_forward", &lstm_recurrence_forward_cpu);
  m.impl("lstm_recurrence_backward", &lstm_recurrence_backward_cpu);
  m.impl("lstm_recurrence_inference", &lstm_recurrence_inference_cpu);
  m.impl("lstm_packed_recurrence_forward", &lstm_packed_recurrence_forward_cpu);
  m.impl("lstm_packed_recurrence_backward", &lstm_packed_recurrence_backward_cpu);
  m.impl("lstm_packed_recurrence_inference", &lstm_packed_recurrence_inference_cpu);
  m.impl("cpu_packed_recurrent_weight_grad", &packed_recurrent_weight_grad_cpu);
  m.impl("cpu_lstm_inference", &lstm_inference_cpu);
  m.impl("cpu_input_projection", &input_projection_cpu);
  m.impl("cpu_input_projection_backward", &input_projection_backward_cpu);
}
