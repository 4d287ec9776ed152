// What the CUDA kernels of the LSTM recurrence contract (docs/contract.md) share: their constants, the element
// pairs of a thread's two units, and the launch geometry that host and device agree on; and, below, the design
// the kernel headers follow (csrc/cuda/README.md lists which file holds what). Framework-free, like every header
// of csrc/cuda: CUDA headers only.
//
// Shape of the computation
// ------------------------
// One launch runs every direction (grid.y) and every batch tile (grid.x) for all T steps. A batch tile is
// 16*MT rows (the MMA's M). Its hidden units are split over a *cluster* of CTAs: a CTA owns `warps*8` units,
// a warp owns 8 consecutive units, and every thread owns 2 units x 2*MT rows, for which it keeps h and c in
// registers the whole sequence. Per step, a CTA multiplies the tile's full state ([rows, K], in shared memory)
// by its slice of the weights, so the matrix product is
//   forward:  pre[rows, 4 gates x own units] = h[rows, Hp]    @ W_hh^T slice   (K = Hp)
//   backward: dh [rows, own units]           = dgates[rows, 4Hp] @ W_hh slice  (K = 4*Hp)
// Each warp's n-tiles are arranged so that the MMA accumulator fragment of a thread holds all four gates of
// its own (row, unit) pairs: the elementwise cell update needs no data exchange at all. The new h (forward) or
// the gate gradients (backward) are then written into the state tile of *every* CTA of the cluster (DSMEM),
// and one cluster barrier per step publishes them. The state tile is double-buffered, so that barrier is the
// only one per step.
//
// Where the weights live (why clusters)
// -------------------------------------
// The recurrent weights never leave the chip. On tensor cores they sit in *registers*, as the MMA's B
// fragments, loaded once: a warp holds 32 columns x K (forward) or 8 columns x 4K (backward), i.e. 64 registers
// per thread for 16-bit operands at H=128 and 128 for TF32. A warp covers 8 units, so H=128 needs 16 warps;
// at 8 warps per CTA (so that a thread may use up to 255 registers) that is a cluster of 2 CTAs on 2 SMs.
// fp32 weights (256 KB at H=128) would not fit one SM's registers or shared memory, which is why the units are
// split across a cluster rather than the batch across CTAs with a full copy each. The IEEE float32/float64
// paths multiply with plain FMAs from weights in shared memory, with as many CTAs per cluster as it takes to
// fit (float64 backward at H=128: 8). Pre-Hopper GPUs have no clusters: there one CTA must hold every unit,
// which limits hidden_size to 64.
//
// Precision
// ---------
// h/c state, accumulators and activations are fp32 (fp64 for float64). bf16/fp16 inputs multiply in their own
// type (h and the gate gradients rounded to it, as cuDNN does). TF32 mode (float32 inputs):
// * forward: fp16 operands with every weight row scaled by a power of two into (-1, 1). fp16 keeps TF32's 11
//   significant bits, the scaling is exact, and h needs none (|h| < 1 after the first step; h0 up to fp16's
//   65504), so products are as accurate as TF32's, at half the registers and twice the tensor-core rate; the
//   scale is applied to the fp32 accumulator. Weights below 2^-14 of their row's largest become fp16
//   subnormals: their absolute error stays below TF32's rounding of the row's largest products.
// * backward: TF32 proper (m16n8k8), since gate gradients have no bound that fp16 could hold.
// Activations: bf16, fp16 and TF32 use __expf-based sigmoid/tanh (~1e-6; tanh.approx.f32, relative error
// ~2^-11, under the kTanhApprox variant); float32/float64 use expf/tanhf (exp/tanh), to match nn.LSTM at 2e-5.
//
// Lengths
// -------
// A batch tile steps only as long as its longest row (the reverse direction starts each row at its own end, so
// in processing order every row runs a prefix of the steps): steps past it are all padding, and only their zero
// outputs are written, with no multiply and no barrier. Any order of lengths is correct; sorted (packed) order
// puts the short rows together, whose tiles then stop early.
//
// Variants
// --------
// lstm_recurrence.h's Variant flags select alternative kernels at run time (csrc/cuda/README.md "Kernel
// variants"): the cluster exchange through st.async and mbarriers instead of barrier.cluster (MbarrierExchange),
// 16-bit saved gates and cells, tanh.approx activations, a 32-row TF32 backward with part of W_hh in shared
// memory, and a backward whose inputs are staged in shared memory several steps ahead (RingInputs). They are
// compiled for sm_90 only; elsewhere a variant kernel is a trap the launcher never selects.
//
// Requirements checked by the planner: hidden <= 128; K is padded to a multiple of 32 with zero weights, the
// units past H own nothing. A thread moves its two adjacent units as one vector access when H is even and every
// tensor starts pair-aligned, as two scalar accesses otherwise (decided once per launch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#ifdef RNN_FAST_PRIMITIVES_HEADER
#include RNN_FAST_PRIMITIVES_HEADER  // tests/library/csrc/cuda_emulation: CPU stand-ins for the PTX primitives
#else
#include "lstm_primitives.cuh"
#endif

namespace rnn_fast::cuda::detail {

constexpr int kGates = 4;
constexpr int kWarpSize = 32;
constexpr int kMaxWarps = 8;
constexpr int kMaxThreads = kWarpSize * kMaxWarps;
constexpr int kUnitsPerWarp = 8;  // one MMA n-tile
constexpr int kTileRows = 16;     // MMA m: batch rows per m-tile
constexpr int kMaxHidden = 128;
constexpr int kHiddenAlign = 32;  // K chunk of the 16-bit MMA path (2 k16 steps x 16 bytes per lane)
constexpr int kMaxCluster = 8;    // portable cluster size
constexpr int kLaneBytes = 16;    // each lane reads 16 bytes of a K chunk from the state tile
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------------------
// Element pairs. A thread's two units are adjacent, so global and shared accesses move pairs.

template <typename T>
struct PairOf;
template <>
struct PairOf<__nv_bfloat16> {
  using type = __nv_bfloat162;
};
template <>
struct PairOf<__half> {
  using type = __half2;
};
template <>
struct PairOf<float> {
  using type = float2;
};
template <>
struct PairOf<double> {
  using type = double2;
};

__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }

__device__ __forceinline__ void unpack(__nv_bfloat162 p, float& a, float& b) {
  a = __low2float(p);
  b = __high2float(p);
}
__device__ __forceinline__ void unpack(__half2 p, float& a, float& b) {
  a = __low2float(p);
  b = __high2float(p);
}
__device__ __forceinline__ void unpack(float2 p, float& a, float& b) {
  a = p.x;
  b = p.y;
}
__device__ __forceinline__ void unpack(double2 p, double& a, double& b) {
  a = p.x;
  b = p.y;
}

__device__ __forceinline__ __nv_bfloat16 narrow(float v, __nv_bfloat16) { return __float2bfloat16_rn(v); }
__device__ __forceinline__ __half narrow(float v, __half) { return __float2half_rn(v); }
__device__ __forceinline__ float narrow(float v, float) { return v; }
__device__ __forceinline__ double narrow(double v, double) { return v; }

__device__ __forceinline__ __nv_bfloat162 join(__nv_bfloat16 a, __nv_bfloat16 b) { return __halves2bfloat162(a, b); }
__device__ __forceinline__ __half2 join(__half a, __half b) { return __halves2half2(a, b); }
__device__ __forceinline__ float2 join(float a, float b) { return make_float2(a, b); }
__device__ __forceinline__ double2 join(double a, double b) { return make_double2(a, b); }

// Global accesses to the elements (p[0], p[1]) of a thread's two units. `paired`: one vector access, which the
// planner allows when H is even and every tensor starts pair-aligned (then ok0 == ok1); else two scalar ones.
// Elements that are not ok (rows past the batch, units past H, steps a row does not run) read as zero.
template <typename T, typename S>
__device__ __forceinline__ void store_pair(T* p, S a, S b, bool ok0, bool ok1, bool paired) {
  using Pair = typename PairOf<T>::type;
  if (paired) {
    if (ok0) *reinterpret_cast<Pair*>(p) = join(narrow(a, T()), narrow(b, T()));
    return;
  }
  if (ok0) p[0] = narrow(a, T());
  if (ok1) p[1] = narrow(b, T());
}

template <typename T>
__device__ __forceinline__ typename PairOf<T>::type load_pair(const T* p, bool ok0, bool ok1, bool paired) {
  using Pair = typename PairOf<T>::type;
  const T zero = narrow(0.0f, T());
  if (paired) return ok0 ? __ldg(reinterpret_cast<const Pair*>(p)) : join(zero, zero);
  return join(ok0 ? __ldg(p) : zero, ok1 ? __ldg(p + 1) : zero);
}

template <typename Pair, typename S>
__device__ __forceinline__ S component(Pair p, int e) {
  S a, b;
  unpack(p, a, b);
  return e == 0 ? a : b;
}

// ---------------------------------------------------------------------------------------------------------
// Launch geometry, shared by host and device.

struct Layout {
  int hidden_padded;   // Hp: hidden rounded up to kHiddenAlign; K is Hp (forward) or 4*Hp (backward)
  int cluster;         // CTAs per cluster, splitting the hidden units
  int warps;           // per CTA; the CTA owns warps * 8 units
  int a_stride;        // Operand elements per row of the state tile
  int w_stride;        // Operand elements per weight row in shared memory (FmaPolicy)
  int a_offset;        // bytes from the start of dynamic shared memory to the two state tiles
  int ring_offset;     // bytes to the backward's input slots (kBackwardPrefetch)
  int ring_slots;      // how many (0 without the variant)
  int barrier_offset;  // bytes to the two mbarriers (kClusterMbarrier)
};

template <class Args>
struct Problem {
  Args args;
  Layout layout;
  bool paired;  // vector pair accesses to global memory (see load_pair)
};

__host__ __device__ inline int64_t step_row(int dir, int seq_len, int t, int batch, int b) {
  return (static_cast<int64_t>(dir) * seq_len + t) * batch + b;
}

// The 2*MT batch rows of a thread: rows g and g+8 of each of the tile's MT m-tiles.
template <int MT>
struct ThreadRows {
  static constexpr int kCount = 2 * MT;
  int batch[kCount];
  int length[kCount];  // 0 for rows past the batch: never active
  bool valid[kCount];

  __device__ __forceinline__ ThreadRows(int tile, int g, int batch_size, int seq_len, const int64_t* lengths) {
#pragma unroll
    for (int i = 0; i < kCount; ++i) {
      batch[i] = tile * kTileRows * MT + local(i, g);
      valid[i] = batch[i] < batch_size;
      int len = seq_len;
      if (lengths != nullptr && valid[i]) {
        const int64_t given = lengths[batch[i]];
        len = given < 0 ? 0 : (given > seq_len ? seq_len : static_cast<int>(given));
      }
      length[i] = valid[i] ? len : 0;
    }
  }
  // Row of the state tile.
  static __device__ __forceinline__ int local(int i, int g) { return kTileRows * (i / 2) + 8 * (i % 2) + g; }
  // Input position of processing step s: direction 1 starts at the row's own last step. Steps a row does not
  // run (s >= length) map to the padded positions t = s, where outputs are written as zeros.
  __device__ __forceinline__ int time(int i, int s, int dir) const {
    return (dir != 0 && s < length[i]) ? length[i] - 1 - s : s;
  }
  // The steps the whole tile runs: its longest row's length, the same in every thread of the cluster (the
  // lanes of a warp hold all the tile's rows between them, 8 groups of 4 lanes).
  __device__ __forceinline__ int tile_steps() const {
    int longest = 0;
#pragma unroll
    for (int i = 0; i < kCount; ++i) longest = length[i] > longest ? length[i] : longest;
#pragma unroll
    for (int mask = 4; mask < kWarpSize; mask *= 2) {
      const int other = __shfl_xor_sync(kFullMask, longest, mask);
      longest = other > longest ? other : longest;
    }
    return longest;
  }
};

}  // namespace rnn_fast::cuda::detail
