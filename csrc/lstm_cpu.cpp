// Fused CPU recurrence of the LSTM contract (docs/contract.md), float32 and float64, plus the cpu backend's
// input projection (rnn_fast::cpu_input_projection) and the cache of output blocks both draw from.
//
// Batch rows never interact in an LSTM, so each OpenMP thread owns one (direction, block of rows) for all T
// steps and never waits for another thread. Per step and per sub-block of rows it runs one single-threaded
// BLAS GEMM (xw_t + h_{t-1} @ W_hh^T forward, grad_pre @ W_hh backward) and one vectorised elementwise pass
// over the rows the GEMM wrote or will read, while they are in cache.
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/native/TensorFactories.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "recurrence_checks.h"

// The Fortran BLAS that ATen itself calls (MKL in the PyTorch wheels, exported by libtorch_cpu). Called
// inside our parallel region, MKL runs single-threaded, which is what the row partition wants.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
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

// pre[rows, 4H] += h[rows, H] @ w_hh[4H, H]^T
template <typename scalar_t>
void accumulate_gates(const scalar_t* h, const scalar_t* w_hh, scalar_t* pre, int64_t rows, int64_t hidden) {
  const int gate_size = static_cast<int>(4 * hidden);
  blas_gemm("T", "N", gate_size, static_cast<int>(rows), static_cast<int>(hidden), w_hh,
            static_cast<int>(hidden), h, static_cast<int>(hidden), scalar_t(1), pre, gate_size);
}

// dh[rows, H] += grad_pre[rows, 4H] @ w_hh[4H, H]
template <typename scalar_t>
void accumulate_hidden_grad(const scalar_t* grad_pre, const scalar_t* w_hh, scalar_t* dh, int64_t rows,
                            int64_t hidden) {
  const int gate_size = static_cast<int>(4 * hidden);
  blas_gemm("N", "N", static_cast<int>(hidden), static_cast<int>(rows), gate_size, w_hh, static_cast<int>(hidden),
            grad_pre, gate_size, scalar_t(1), dh, static_cast<int>(hidden));
}

// ---------------------------------------------------------------------------------------------------------
// Elementwise passes over a sub-block of rows at one step. `step` is the input position t; a row runs at t
// when t < lengths[b] (lengths == nullptr: every row runs).

template <typename scalar_t>
struct ForwardStep {
  scalar_t* gates;     // [rows, 4H]: pre-activations in, activated gates out
  scalar_t* cell;      // [rows, H]
  scalar_t* y;         // [rows, H]
  scalar_t* h;         // [rows, H] running state, updated in place
  scalar_t* c;         // [rows, H] running state, updated in place
  const int64_t* lengths;
  int64_t step, rows, hidden;
};

template <typename scalar_t>
RNN_FAST_INLINE void forward_cells(const ForwardStep<scalar_t>& s) {
  const int64_t H = s.hidden, G = 4 * H;
  for (int64_t r = 0; r < s.rows; ++r) {
    scalar_t* gates = s.gates + r * G;
    scalar_t* cell = s.cell + r * H;
    scalar_t* y = s.y + r * H;
    if (s.lengths != nullptr && s.step >= s.lengths[r]) {
      std::fill(gates, gates + G, scalar_t(0));
      std::fill(cell, cell + H, scalar_t(0));
      std::fill(y, y + H, scalar_t(0));
      continue;
    }
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
      gates[j] = i;
      gates[H + j] = f;
      gates[2 * H + j] = g;
      gates[3 * H + j] = o;
      cell[j] = c_next;
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
  const scalar_t* cell_prev;  // [rows, H]: cell at the previous processed step
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
    scalar_t* grad_pre = s.grad_pre + r * G;
    if (s.lengths != nullptr && s.step >= s.lengths[r]) {
      // The state passes through a padded step untouched; dh is kept since the GEMM adds 0 to it.
      std::fill(grad_pre, grad_pre + G, scalar_t(0));
      continue;
    }
    const int64_t row_first_step = s.reverse && s.lengths != nullptr ? s.lengths[r] - 1 : s.first_step;
    const scalar_t* cell_prev = (s.step == row_first_step ? s.c0 : s.cell_prev) + r * H;
    const scalar_t* gates = s.gates + r * G;
    const scalar_t* cell = s.cell + r * H;
    const scalar_t* grad_y = s.grad_y + r * H;
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

RNN_FAST_TARGET_CLONES void forward_cells_vectorised(const ForwardStep<float>& s) { forward_cells(s); }
RNN_FAST_TARGET_CLONES void forward_cells_vectorised(const ForwardStep<double>& s) { forward_cells(s); }
RNN_FAST_TARGET_CLONES void backward_cells_vectorised(const BackwardStep<float>& s) { backward_cells(s); }
RNN_FAST_TARGET_CLONES void backward_cells_vectorised(const BackwardStep<double>& s) { backward_cells(s); }

// ---------------------------------------------------------------------------------------------------------
// Work partition: (direction, block of rows) pairs, at least one per thread.

struct RowBlock {
  int64_t direction, begin, end;
};

struct Partition {
  int64_t blocks_per_direction, rows_per_block, num_blocks;

  Partition(int64_t num_directions, int64_t batch, int64_t threads) {
    const int64_t wanted = std::max<int64_t>(1, (threads + num_directions - 1) / num_directions);
    rows_per_block = std::max<int64_t>(1, (batch + wanted - 1) / wanted);
    blocks_per_direction = (batch + rows_per_block - 1) / rows_per_block;
    num_blocks = num_directions * blocks_per_direction;
  }

  RowBlock block(int64_t index) const {
    const int64_t begin = (index % blocks_per_direction) * rows_per_block;
    return {index / blocks_per_direction, begin, begin + rows_per_block};
  }
};

// Runs body(RowBlock{direction, begin, end}) for every (direction, block of rows), each on one thread.
template <typename Body>
void for_each_row_block(int64_t num_directions, int64_t batch, const Body& body) {
  const int64_t threads = at::get_num_threads();
  const Partition partition(num_directions, batch, threads);
  if (partition.num_blocks == 0) {
    return;
  }
  const int64_t team = std::min(threads, partition.num_blocks);
#pragma omp parallel for num_threads(team) schedule(static, 1)
  for (int64_t index = 0; index < partition.num_blocks; ++index) {
    const RowBlock block = partition.block(index);
    body(RowBlock{block.direction, block.begin, std::min(block.end, batch)});
  }
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

// ---------------------------------------------------------------------------------------------------------
// The ops.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_recurrence_forward_cpu(
    const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
    const std::optional<at::Tensor>& lengths) {
  const auto dtype = xw.scalar_type();
  check_supported_dtype(dtype);
  const auto sizes = rnn_fast::check_forward_inputs(xw, w_hh, h0, c0, lengths);
  check_length_values(lengths, sizes.T);
  const int64_t D = sizes.D, T = sizes.T, B = sizes.B, H = sizes.H, G = 4 * H;

  auto y = empty_output({D, T, B, H}, xw.options());
  auto gates = empty_output({D, T, B, G}, xw.options());
  auto cell = empty_output({D, T, B, H}, xw.options());
  // The final state is the running state, updated in place step after step.
  auto h_n = h0.clone();
  auto c_n = c0.clone();

  DISPATCH_FLOAT_AND_DOUBLE(dtype, "lstm_recurrence_forward", [&] {
    const scalar_t* xw_p = xw.data_ptr<scalar_t>();
    const scalar_t* w_p = w_hh.data_ptr<scalar_t>();
    scalar_t* y_p = y.data_ptr<scalar_t>();
    scalar_t* gates_p = gates.data_ptr<scalar_t>();
    scalar_t* cell_p = cell.data_ptr<scalar_t>();
    scalar_t* h_p = h_n.data_ptr<scalar_t>();
    scalar_t* c_p = c_n.data_ptr<scalar_t>();
    const int64_t* len_p = lengths_data(lengths);
    for_each_row_block(D, B, [&](RowBlock block) {
      const int64_t d = block.direction;
      const scalar_t* w = w_p + d * G * H;
      for (int64_t s = 0; s < T; ++s) {
        const int64_t t = d == 0 ? s : T - 1 - s;
        for (int64_t b = block.begin; b < block.end; b += kRowsPerSubBlock) {
          const int64_t rows = std::min(kRowsPerSubBlock, block.end - b);
          const int64_t step_row = (d * T + t) * B + b;  // row b of [D, T, B, *]
          const int64_t state_row = d * B + b;           // row b of [D, B, *]
          // xw is read in one streaming copy, and the GEMM then accumulates onto it in cache: cheaper than
          // letting BLAS zero the block (beta = 0) and reading xw again in the elementwise pass.
          std::memcpy(gates_p + step_row * G, xw_p + step_row * G, rows * G * sizeof(scalar_t));
          accumulate_gates(h_p + state_row * H, w, gates_p + step_row * G, rows, H);
          forward_cells_vectorised(ForwardStep<scalar_t>{
              gates_p + step_row * G, cell_p + step_row * H, y_p + step_row * H,
              h_p + state_row * H, c_p + state_row * H, len_p == nullptr ? nullptr : len_p + b, t, rows, H});
        }
      }
    });
  });
  return {y, h_n, c_n, gates, cell};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_recurrence_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& w_hh,
    const at::Tensor& c0, const at::Tensor& gates, const at::Tensor& cell, const std::optional<at::Tensor>& lengths) {
  const auto dtype = w_hh.scalar_type();
  check_supported_dtype(dtype);
  const auto sizes = rnn_fast::check_backward_inputs(grad_y, grad_h_n, grad_c_n, w_hh, c0, gates, cell, lengths);
  check_length_values(lengths, sizes.T);
  const int64_t D = sizes.D, T = sizes.T, B = sizes.B, H = sizes.H, G = 4 * H;

  auto grad_xw = empty_output({D, T, B, G}, gates.options());
  // The gradients at the initial state are the running dh/dc, updated in place step after step.
  auto grad_h0 = grad_h_n.clone();
  auto grad_c0 = grad_c_n.clone();

  DISPATCH_FLOAT_AND_DOUBLE(dtype, "lstm_recurrence_backward", [&] {
    const scalar_t* grad_y_p = grad_y.data_ptr<scalar_t>();
    const scalar_t* w_p = w_hh.data_ptr<scalar_t>();
    const scalar_t* c0_p = c0.data_ptr<scalar_t>();
    const scalar_t* gates_p = gates.data_ptr<scalar_t>();
    const scalar_t* cell_p = cell.data_ptr<scalar_t>();
    scalar_t* grad_xw_p = grad_xw.data_ptr<scalar_t>();
    scalar_t* dh_p = grad_h0.data_ptr<scalar_t>();
    scalar_t* dc_p = grad_c0.data_ptr<scalar_t>();
    const int64_t* len_p = lengths_data(lengths);
    for_each_row_block(D, B, [&](RowBlock block) {
      const int64_t d = block.direction;
      const scalar_t* w = w_p + d * G * H;
      const int64_t first_step = d == 0 ? 0 : T - 1;
      // Steps in reverse processing order: direction 0 goes t = T-1 .. 0, direction 1 goes t = 0 .. T-1.
      for (int64_t s = 0; s < T; ++s) {
        const int64_t t = d == 0 ? T - 1 - s : s;
        const int64_t t_prev = d == 0 ? t - 1 : t + 1;  // previous processed step in the forward pass
        for (int64_t b = block.begin; b < block.end; b += kRowsPerSubBlock) {
          const int64_t rows = std::min(kRowsPerSubBlock, block.end - b);
          const int64_t step_row = (d * T + t) * B + b;
          const int64_t prev_row = (d * T + t_prev) * B + b;  // only read when t_prev is a valid step
          const int64_t state_row = d * B + b;
          backward_cells_vectorised(BackwardStep<scalar_t>{
              grad_y_p + step_row * H, gates_p + step_row * G, cell_p + step_row * H,
              t == first_step ? nullptr : cell_p + prev_row * H, c0_p + state_row * H, grad_xw_p + step_row * G,
              dh_p + state_row * H, dc_p + state_row * H, len_p == nullptr ? nullptr : len_p + b, t, first_step,
              rows, H, d == 1});
          accumulate_hidden_grad(grad_xw_p + step_row * G, w, dh_p + state_row * H, rows, H);
        }
      }
    });
  });
  return {grad_xw, grad_h0, grad_c0};
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

at::Tensor input_projection_cpu(const at::Tensor& parts, const at::Tensor& w_ih, const std::optional<at::Tensor>& bias) {
  check_projection(parts, w_ih);
  const int64_t P = parts.size(0), T = parts.size(1), B = parts.size(2), K = parts.size(3);
  const int64_t D = w_ih.size(0), G = w_ih.size(1);
  if (bias.has_value()) {
    RNN_FAST_CHECK_INPUT((*bias), parts.device(), parts.scalar_type(), D, G);
  }
  auto xw = empty_output({D, T, B, G}, parts.options());
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t p = 0; p < P; ++p) {
      const auto weight = part_weight(w_ih, d, p, K).t();
      for (auto& [input, out] : step_matrices(parts[p], xw[d])) {
        if (p > 0) {
          out.addmm_(input, weight);
        } else if (bias.has_value()) {
          at::addmm_out(out, (*bias)[d], input, weight);
        } else {
          at::mm_out(out, input, weight);
        }
      }
    }
  }
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(rnn_fast, m) {
  // Side effect only (returns the bytes given back): call it eagerly, outside torch.compile.
  m.def("cpu_release_cached_blocks() -> int", [] { return OutputBlockCache::instance().release_unused(); });
  m.def("cpu_input_projection(Tensor parts, Tensor w_ih, Tensor? bias) -> Tensor xw");
  m.def(
      "cpu_input_projection_backward(Tensor grad_xw, Tensor parts, Tensor w_ih, bool[3] output_mask)"
      " -> (Tensor grad_parts, Tensor grad_w_ih, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(rnn_fast, CPU, m) {
  m.impl("lstm_recurrence_forward", &lstm_recurrence_forward_cpu);
  m.impl("lstm_recurrence_backward", &lstm_recurrence_backward_cpu);
  m.impl("cpu_input_projection", &input_projection_cpu);
  m.impl("cpu_input_projection_backward", &input_projection_backward_cpu);
}
