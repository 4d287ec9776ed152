// CUDA kernels of the LSTM recurrence contract (docs/contract.md). Framework-free: CUDA headers only.
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
// Activations: bf16 uses tanh.approx.f32 (relative error ~2^-11, below bf16's 2^-8); fp16 and TF32 use
// __expf-based sigmoid/tanh (~1e-6); float32/float64 use expf/tanhf (exp/tanh), to match nn.LSTM at 2e-5.
//
// Requirements checked by the planner: hidden <= 128; K is padded to a multiple of 32 with zero weights, the
// units past H own nothing. A thread moves its two adjacent units as one vector access when H is even and every
// tensor starts pair-aligned, as two scalar accesses otherwise (decided once per launch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "lstm_recurrence.h"

#ifdef RNN_FAST_PRIMITIVES_HEADER
#include RNN_FAST_PRIMITIVES_HEADER  // tests/cuda_emulation: CPU stand-ins for the PTX primitives
#else
#include "lstm_primitives.cuh"
#endif

namespace rnn_fast {
namespace cuda {
namespace detail {

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
// Shared memory of the cluster.

// Writes `v` at the same shared-memory offset in every CTA of the cluster (just this CTA when cluster == 1).
template <typename Raw>
__device__ __forceinline__ void publish(void* local, Raw v, int cluster) {
  if (cluster == 1) {
    *reinterpret_cast<Raw*>(local) = v;
    return;
  }
#if RNN_FAST_HAS_CLUSTERS
  const uint32_t addr = shared_address(local);
  for (int rank = 0; rank < cluster; ++rank) {
    store_cluster(cluster_address(addr, rank), v);
  }
#else
  __trap();  // the planner never launches clusters before sm_90
#endif
}

// The per-step barrier, split so that global stores overlap its latency. Release/acquire makes every CTA's
// shared-memory writes before arrive visible to every CTA after wait.
__device__ __forceinline__ void step_arrive(int cluster) {
  if (cluster == 1) {
    __syncthreads();
    return;
  }
#if RNN_FAST_HAS_CLUSTERS
  cluster_arrive();
#else
  __trap();
#endif
}

__device__ __forceinline__ void step_wait(int cluster) {
  if (cluster == 1) {
    return;
  }
#if RNN_FAST_HAS_CLUSTERS
  cluster_wait();
#else
  __trap();
#endif
}

__device__ __forceinline__ void step_barrier(int cluster) {
  step_arrive(cluster);
  step_wait(cluster);
}

// ---------------------------------------------------------------------------------------------------------
// Activations.

struct ApproxActivations {
  static __device__ __forceinline__ float tanh(float x) { return tanh_approx(x); }
  static __device__ __forceinline__ float sigmoid(float x) { return fmaf(0.5f, tanh(0.5f * x), 0.5f); }
};

struct ExpActivations {
  // __expf overflows to inf for very negative x and __fdividef(1, inf) is 0: the limits come out right.
  static __device__ __forceinline__ float sigmoid(float x) { return __fdividef(1.0f, 1.0f + __expf(-x)); }
  static __device__ __forceinline__ float tanh(float x) { return fmaf(2.0f, sigmoid(2.0f * x), -1.0f); }
};

template <typename S>
struct ExactActivations;
template <>
struct ExactActivations<float> {
  static __device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
  static __device__ __forceinline__ float tanh(float x) { return tanhf(x); }
};
template <>
struct ExactActivations<double> {
  static __device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + ::exp(-x)); }
  static __device__ __forceinline__ double tanh(double x) { return ::tanh(x); }
};

// ---------------------------------------------------------------------------------------------------------
// Tensor-core instructions. Fragment layouts (PTX ISA, mma.m16n8k16 / m16n8k8), lane = 4*g + t:
//   A: rows g and g+8; 16-bit: k = 2t,2t+1 (regs 0,1) and 2t+8,2t+9 (regs 2,3); tf32: k = t (0,1), t+4 (2,3)
//   B: column g;       16-bit: k = 2t,2t+1 (reg 0) and 2t+8,2t+9 (reg 1);      tf32: k = t (0), t+4 (1)
//   C: rows g (regs 0,1) and g+8 (regs 2,3), columns 2t, 2t+1.
// Every lane reads 16 contiguous bytes of a 64-byte K chunk (two MMA k-steps), at byte 16t. Which
// physical k feeds which logical k of an MMA does not matter as long as A and B agree, so both sides use:
//   regs .x,.y of the 16 bytes -> k-step 0 (A regs {lo.x, hi.x, lo.y, hi.y}, B regs {w.x, w.y})
//   regs .z,.w                 -> k-step 1 (A regs {lo.z, hi.z, lo.w, hi.w}, B regs {w.z, w.w})
// with lo/hi the state rows g and g+8. One 128-bit shared load then feeds two MMAs.

struct Bf16Mma {
  using Operand = __nv_bfloat16;
  static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    mma_m16n8k16_bf16(c, a0, a1, a2, a3, b0, b1);
  }
  static __device__ __forceinline__ uint32_t word(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ Operand operand(float v) { return __float2bfloat16_rn(v); }
};

struct Fp16Mma {
  using Operand = __half;
  static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    mma_m16n8k16_f16(c, a0, a1, a2, a3, b0, b1);
  }
  static __device__ __forceinline__ uint32_t word(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  static __device__ __forceinline__ Operand operand(float v) { return __float2half_rn(v); }
};

struct Tf32Mma {
  using Operand = float;  // holds TF32 values: fp32 bit patterns rounded to 10 mantissa bits
  static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    mma_m16n8k8_tf32(c, a0, a1, a2, a3, b0, b1);
  }
  static __device__ __forceinline__ uint32_t tf32(float v) { return round_to_tf32(v); }
  static __device__ __forceinline__ Operand operand(float v) { return __uint_as_float(tf32(v)); }
};

// Packs one lane's 16 bytes of a K chunk from its values in k order.
template <class Op>
__device__ __forceinline__ uint4 pack_lane(const float (&v)[kLaneBytes / sizeof(typename Op::Operand)]) {
  if constexpr (sizeof(typename Op::Operand) == 2) {
    return make_uint4(Op::word(v[0], v[1]), Op::word(v[2], v[3]), Op::word(v[4], v[5]), Op::word(v[6], v[7]));
  } else {
    return make_uint4(Op::tf32(v[0]), Op::tf32(v[1]), Op::tf32(v[2]), Op::tf32(v[3]));
  }
}

// Two state values as they are written into the state tile.
template <class Op>
__device__ __forceinline__ auto pack_operands(float a, float b) {
  if constexpr (sizeof(typename Op::Operand) == 2) {
    return Op::word(a, b);
  } else {
    return make_uint2(Op::tf32(a), Op::tf32(b));
  }
}

// ---------------------------------------------------------------------------------------------------------
// How a CTA multiplies its state tile by its weight columns. Both policies produce the MMA C-fragment layout:
// acc[m][nt][2*half + e] is row 16m + 8*half + g of the tile and column 2t + e of the warp's n-tile nt.
//
// `fetch(k, nt, unit)` gives the weight B[k][column] of n-tile nt's column for hidden unit `unit`.

// Weights in registers as B fragments; tensor-core MMAs. kScaledRows: each column (a row of W_hh) is divided
// by a power of two at load and the accumulator multiplied back (the TF32-as-fp16 forward).
template <class Op, class Act, bool kScaledRows>
struct MmaPolicy {
  using Operand = typename Op::Operand;
  using State = float;
  using Activations = Act;
  static constexpr bool kWeightsInSmem = false;
  static constexpr int kLaneElems = kLaneBytes / sizeof(Operand);
  static constexpr int kChunkElems = 4 * kLaneElems;  // K per 64-byte chunk

  template <int NT, int kMaxK>
  struct Weights {
    static constexpr int kChunks = kMaxK / kChunkElems;
    uint4 frag[NT][kChunks];
    float column_scale[NT][2];
    __device__ __forceinline__ float scale(int nt, int e) const { return kScaledRows ? column_scale[nt][e] : 1.0f; }
  };

  template <int NT, int kMaxK, class Fetch>
  static __device__ __forceinline__ void load(Weights<NT, kMaxK>& w, const Fetch& fetch, int k_total,
                                              unsigned char* /*smem*/, int /*w_stride*/, int warps, int rank) {
    const int lane = threadIdx.x % kWarpSize, g = lane / 4, t = lane % 4;
    const int unit = (rank * warps + static_cast<int>(threadIdx.x) / kWarpSize) * kUnitsPerWarp + g;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      float inv_scale = 1.0f;
      if constexpr (kScaledRows) {
        float amax = 0.0f;
#pragma unroll
        for (int j = 0; j < Weights<NT, kMaxK>::kChunks; ++j) {
          if (j * kChunkElems < k_total) {
#pragma unroll
            for (int i = 0; i < kLaneElems; ++i) {
              amax = fmaxf(amax, fabsf(fetch(j * kChunkElems + t * kLaneElems + i, nt, unit)));
            }
          }
        }
        // The four lanes of a quad share column g.
        amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, 1));
        amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, 2));
        int exponent = 0;
        frexpf(amax, &exponent);  // amax = m * 2^exponent, m in [0.5, 1): |w| / 2^exponent < 1
        inv_scale = ldexpf(1.0f, -exponent);
        const float scale = ldexpf(1.0f, exponent);
        // This thread accumulates columns 2t and 2t+1, whose scales live in the quads g = 2t and 2t+1.
        w.column_scale[nt][0] = __shfl_sync(kFullMask, scale, 4 * (2 * t));
        w.column_scale[nt][1] = __shfl_sync(kFullMask, scale, 4 * (2 * t + 1));
      }
#pragma unroll
      for (int j = 0; j < Weights<NT, kMaxK>::kChunks; ++j) {
        float v[kLaneElems];
#pragma unroll
        for (int i = 0; i < kLaneElems; ++i) {
          const int k = j * kChunkElems + t * kLaneElems + i;
          v[i] = k < k_total ? fetch(k, nt, unit) * inv_scale : 0.0f;
        }
        w.frag[nt][j] = pack_lane<Op>(v);
      }
    }
  }

  template <int MT, int NT, int kMaxK>
  static __device__ __forceinline__ void multiply(float (&acc)[MT][NT][4], const Weights<NT, kMaxK>& w,
                                                  const Operand* tile, int stride, int k_total) {
    // Independent accumulation chains keep the tensor pipe busy when a warp has few tiles: at least 4.
    constexpr int kSplit = MT * NT >= 4 ? 1 : 4 / (MT * NT);
    float part[kSplit][MT][NT][4];
#pragma unroll
    for (int p = 0; p < kSplit; ++p)
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int c = 0; c < 4; ++c) part[p][m][nt][c] = 0.0f;

    const int lane = threadIdx.x % kWarpSize, g = lane / 4, t = lane % 4;
    const unsigned char* base = reinterpret_cast<const unsigned char*>(tile + g * stride) + t * kLaneBytes;
    const int row_bytes = stride * static_cast<int>(sizeof(Operand));
#pragma unroll
    for (int j = 0; j < Weights<NT, kMaxK>::kChunks; ++j) {
      if (j * kChunkElems < k_total) {
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const unsigned char* p = base + (m * kTileRows) * row_bytes + j * 4 * kLaneBytes;
          const uint4 lo = *reinterpret_cast<const uint4*>(p);
          const uint4 hi = *reinterpret_cast<const uint4*>(p + 8 * row_bytes);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const uint4 b = w.frag[nt][j];
            Op::mma(part[j % kSplit][m][nt], lo.x, hi.x, lo.y, hi.y, b.x, b.y);
            Op::mma(part[j % kSplit][m][nt], lo.z, hi.z, lo.w, hi.w, b.z, b.w);
          }
        }
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          float sum = part[0][m][nt][c];
#pragma unroll
          for (int p = 1; p < kSplit; ++p) sum += part[p][m][nt][c];
          acc[m][nt][c] = sum;
        }
  }

  static __device__ __forceinline__ Operand operand(float v) { return Op::operand(v); }
  static __device__ __forceinline__ auto operands(float a, float b) { return pack_operands<Op>(a, b); }
};

// IEEE path: weights in shared memory, one row per output column ([column][k], k contiguous), plain FMAs.
template <typename S>
struct FmaPolicy {
  using Operand = S;
  using State = S;
  using Activations = ExactActivations<S>;
  using Vec = typename std::conditional<sizeof(S) == 4, float4, double2>::type;
  static constexpr bool kWeightsInSmem = true;
  static constexpr int kLaneElems = kLaneBytes / sizeof(S);
  static constexpr int kChunkElems = kLaneElems;

  template <int NT, int kMaxK>
  struct Weights {
    const S* rows;
    int stride;
    __device__ __forceinline__ S scale(int, int) const { return S(1); }
  };

  // All threads of the CTA fill the columns of all its warps, walking global memory contiguously.
  template <int NT, int kMaxK, class Fetch>
  static __device__ __forceinline__ void load(Weights<NT, kMaxK>& w, const Fetch& fetch, int k_total,
                                              unsigned char* smem, int w_stride, int warps, int rank) {
    S* rows = reinterpret_cast<S*>(smem);
    const int columns = warps * NT * kUnitsPerWarp;
    const int count = columns * k_total;
    for (int idx = threadIdx.x; idx < count; idx += blockDim.x) {
      const int column = Fetch::kContiguousInK ? idx / k_total : idx % columns;
      const int k = Fetch::kContiguousInK ? idx % k_total : idx / columns;
      const int warp = column / (NT * kUnitsPerWarp), nt = (column / kUnitsPerWarp) % NT;
      const int unit = (rank * warps + warp) * kUnitsPerWarp + column % kUnitsPerWarp;
      rows[column * w_stride + k] = fetch(k, nt, unit);
    }
    w.rows = rows;
    w.stride = w_stride;
  }

  static __device__ __forceinline__ S dot(const Vec& a, const Vec& b, S c) {
    if constexpr (sizeof(S) == 4) {
      c = fmaf(a.x, b.x, c);
      c = fmaf(a.y, b.y, c);
      c = fmaf(a.z, b.z, c);
      return fmaf(a.w, b.w, c);
    } else {
      c = fma(a.x, b.x, c);
      return fma(a.y, b.y, c);
    }
  }

  template <int MT, int NT, int kMaxK>
  static __device__ __forceinline__ void multiply(S (&acc)[MT][NT][4], const Weights<NT, kMaxK>& w, const S* tile,
                                                  int stride, int k_total) {
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[m][nt][c] = S(0);
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize, g = lane / 4, t = lane % 4;
    const S* a_rows = tile + g * stride;
    const S* b_rows = w.rows + ((warp * NT) * kUnitsPerWarp + 2 * t) * w.stride;
#pragma unroll 2
    for (int k = 0; k < k_total; k += kLaneElems) {
      Vec a[MT][2];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        a[m][0] = *reinterpret_cast<const Vec*>(a_rows + (m * kTileRows) * stride + k);
        a[m][1] = *reinterpret_cast<const Vec*>(a_rows + (m * kTileRows + 8) * stride + k);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const Vec b0 = *reinterpret_cast<const Vec*>(b_rows + (nt * kUnitsPerWarp) * w.stride + k);
        const Vec b1 = *reinterpret_cast<const Vec*>(b_rows + (nt * kUnitsPerWarp + 1) * w.stride + k);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          acc[m][nt][0] = dot(a[m][0], b0, acc[m][nt][0]);
          acc[m][nt][1] = dot(a[m][0], b1, acc[m][nt][1]);
          acc[m][nt][2] = dot(a[m][1], b0, acc[m][nt][2]);
          acc[m][nt][3] = dot(a[m][1], b1, acc[m][nt][3]);
        }
      }
    }
  }

  static __device__ __forceinline__ S operand(S v) { return v; }
  static __device__ __forceinline__ auto operands(S a, S b) {
    if constexpr (sizeof(S) == 4) {
      return make_uint2(__float_as_uint(a), __float_as_uint(b));
    } else {
      const unsigned long long ua = __double_as_longlong(a), ub = __double_as_longlong(b);
      return make_uint4(static_cast<uint32_t>(ua), static_cast<uint32_t>(ua >> 32), static_cast<uint32_t>(ub),
                        static_cast<uint32_t>(ub >> 32));
    }
  }
};

// ---------------------------------------------------------------------------------------------------------
// Weight columns of the two kernels.

// Forward: column (gate, unit) is row gate*H + unit of W_hh; K runs over its H inputs (padded to Hp).
template <typename Elem, typename S>
struct ForwardWeights {
  static constexpr bool kContiguousInK = true;
  const Elem* w;  // this direction's [4H, H]
  int hidden;
  __device__ __forceinline__ S operator()(int k, int gate, int unit) const {
    return (k < hidden && unit < hidden) ? widen(w[static_cast<int64_t>(gate * hidden + unit) * hidden + k]) : S(0);
  }
};

// Backward: column `unit` is column `unit` of W_hh; K runs over the 4 gates x Hp padded gate rows.
template <typename Elem, typename S>
struct BackwardWeights {
  static constexpr bool kContiguousInK = false;
  const Elem* w;
  int hidden, hidden_padded;
  __device__ __forceinline__ S operator()(int k, int /*nt*/, int unit) const {
    const int gate = k / hidden_padded, input = k - gate * hidden_padded;
    return (input < hidden && unit < hidden) ? widen(w[static_cast<int64_t>(gate * hidden + input) * hidden + unit])
                                             : S(0);
  }
};

// ---------------------------------------------------------------------------------------------------------
// Launch geometry, shared by host and device.

struct Layout {
  int hidden_padded;  // Hp: hidden rounded up to kHiddenAlign; K is Hp (forward) or 4*Hp (backward)
  int cluster;        // CTAs per cluster, splitting the hidden units
  int warps;          // per CTA; the CTA owns warps * 8 units
  int a_stride;       // Operand elements per row of the state tile
  int w_stride;       // Operand elements per weight row in shared memory (FmaPolicy)
  int a_offset;       // bytes from the start of dynamic shared memory to the two state tiles
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
};

// ---------------------------------------------------------------------------------------------------------
// Forward kernel.

template <class Policy, typename Elem, int MT>
__global__ void __launch_bounds__(kMaxThreads, 1)
    lstm_forward_kernel(const Problem<RecurrenceForwardArgs<Elem, typename Policy::State>> problem) {
  using S = typename Policy::State;
  using Operand = typename Policy::Operand;
  using Act = typename Policy::Activations;
  using ElemPair = typename PairOf<Elem>::type;
  constexpr int NT = kGates;
  constexpr int R = 2 * MT;
  unsigned char* smem = dynamic_shared_memory();

  const auto& a = problem.args;
  const Layout& layout = problem.layout;
  const int T = a.seq_len, B = a.batch, H = a.hidden, G = kGates * H, Hp = layout.hidden_padded;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, g = lane / 4, t4 = lane % 4;
  const int rank = blockIdx.x % layout.cluster, tile = blockIdx.x / layout.cluster, dir = blockIdx.y;
  const int unit = (rank * layout.warps + warp) * kUnitsPerWarp + 2 * t4;  // this thread's units: unit, unit+1
  const bool unit_ok[2] = {unit < H, unit + 1 < H};
  const bool paired = problem.paired;
  const ThreadRows<MT> rows(tile, g, B, T, a.lengths);

  typename Policy::template Weights<NT, kMaxHidden> weights;
  Policy::load(weights, ForwardWeights<Elem, S>{a.w_hh + static_cast<int64_t>(dir) * G * H, H}, Hp, smem,
               layout.w_stride, layout.warps, rank);

  // State tiles [2][16*MT][a_stride]; tile 0 starts as h0, in full (every CTA needs all Hp inputs).
  Operand* tiles = reinterpret_cast<Operand*>(smem + layout.a_offset);
  const int tile_elems = kTileRows * MT * layout.a_stride;
  for (int idx = threadIdx.x; idx < kTileRows * MT * Hp; idx += blockDim.x) {
    const int row = idx / Hp, k = idx % Hp, b = tile * kTileRows * MT + row;
    const S v = (b < B && k < H) ? widen(a.h0[(static_cast<int64_t>(dir) * B + b) * H + k]) : S(0);
    tiles[row * layout.a_stride + k] = Policy::operand(v);
  }

  S h[R][2], c[R][2];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const bool io0 = rows.valid[i] && unit_ok[0], io1 = rows.valid[i] && unit_ok[1];
    const int64_t at = (static_cast<int64_t>(dir) * B + rows.batch[i]) * H + unit;
    unpack(load_pair(a.h0 + at, io0, io1, paired), h[i][0], h[i][1]);
    unpack(load_pair(a.c0 + at, io0, io1, paired), c[i][0], c[i][1]);
  }

  // xw of the next step, in flight while this step multiplies.
  ElemPair xw[R][NT];
  auto load_xw = [&](int s) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const bool runs = s < rows.length[i];
      const Elem* p = a.xw + step_row(dir, T, rows.time(i, s, dir), B, rows.batch[i]) * G + unit;
#pragma unroll
      for (int gate = 0; gate < NT; ++gate) {
        xw[i][gate] = load_pair(p + gate * H, runs && unit_ok[0], runs && unit_ok[1], paired);
      }
    }
  };
  load_xw(0);
  step_barrier(layout.cluster);  // tile 0 and shared weights written; every CTA of the cluster running

  for (int s = 0; s < T; ++s) {
    S acc[MT][NT][4];
    Policy::multiply(acc, weights, tiles + (s & 1) * tile_elems, layout.a_stride, Hp);
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int gate = 0; gate < NT; ++gate) {
          S x0, x1;
          unpack(xw[2 * m + half][gate], x0, x1);
          acc[m][gate][2 * half] = fma(acc[m][gate][2 * half], weights.scale(gate, 0), x0);
          acc[m][gate][2 * half + 1] = fma(acc[m][gate][2 * half + 1], weights.scale(gate, 1), x1);
        }
    if (s + 1 < T) load_xw(s + 1);

    S cell_out[R][2], y_out[R][2];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int i = 2 * m + half;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const bool active = s < rows.length[i] && unit_ok[e];
          const int col = 2 * half + e;
          const S ig = Act::sigmoid(acc[m][0][col]);
          const S fg = Act::sigmoid(acc[m][1][col]);
          const S gg = Act::tanh(acc[m][2][col]);
          const S og = Act::sigmoid(acc[m][3][col]);
          const S c_new = fg * c[i][e] + ig * gg;
          const S h_new = og * Act::tanh(c_new);
          if (active) {
            c[i][e] = c_new;
            h[i][e] = h_new;
          }
          acc[m][0][col] = active ? ig : S(0);
          acc[m][1][col] = active ? fg : S(0);
          acc[m][2][col] = active ? gg : S(0);
          acc[m][3][col] = active ? og : S(0);
          cell_out[i][e] = active ? c_new : S(0);
          y_out[i][e] = active ? h_new : S(0);
        }
      }

    // h enters every CTA's next tile; rows that stopped keep their last h, which only their own row reads.
    Operand* next = tiles + ((s + 1) & 1) * tile_elems;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      publish(next + ThreadRows<MT>::local(i, g) * layout.a_stride + unit, Policy::operands(h[i][0], h[i][1]),
              layout.cluster);
    }
    step_arrive(layout.cluster);
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int i = 2 * m + half;
        const bool io0 = rows.valid[i] && unit_ok[0], io1 = rows.valid[i] && unit_ok[1];
        const int64_t row = step_row(dir, T, rows.time(i, s, dir), B, rows.batch[i]);
#pragma unroll
        for (int gate = 0; gate < NT; ++gate) {
          store_pair(a.gates + row * G + gate * H + unit, acc[m][gate][2 * half], acc[m][gate][2 * half + 1], io0,
                     io1, paired);
        }
        store_pair(a.cell + row * H + unit, cell_out[i][0], cell_out[i][1], io0, io1, paired);
        store_pair(a.y + row * H + unit, y_out[i][0], y_out[i][1], io0, io1, paired);
      }
    step_wait(layout.cluster);
  }

#pragma unroll
  for (int i = 0; i < R; ++i) {
    const bool io0 = rows.valid[i] && unit_ok[0], io1 = rows.valid[i] && unit_ok[1];
    const int64_t at = (static_cast<int64_t>(dir) * B + rows.batch[i]) * H + unit;
    store_pair(a.h_n + at, h[i][0], h[i][1], io0, io1, paired);
    store_pair(a.c_n + at, c[i][0], c[i][1], io0, io1, paired);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward kernel: processing steps in reverse; per step the elementwise gate gradients of the thread's
// (row, unit) pairs, published to the cluster, then dh = dgates @ W_hh for the thread's pairs.

template <class Policy, typename Elem, int MT>
__global__ void __launch_bounds__(kMaxThreads, 1)
    lstm_backward_kernel(const Problem<RecurrenceBackwardArgs<Elem, typename Policy::State>> problem) {
  using S = typename Policy::State;
  using Operand = typename Policy::Operand;
  using Act = typename Policy::Activations;
  using ElemPair = typename PairOf<Elem>::type;
  using StatePair = typename PairOf<S>::type;
  using Wide = decltype(widen(std::declval<Elem>()));  // Elem's arithmetic type
  constexpr int R = 2 * MT;
  unsigned char* smem = dynamic_shared_memory();

  const auto& a = problem.args;
  const Layout& layout = problem.layout;
  const int T = a.seq_len, B = a.batch, H = a.hidden, G = kGates * H, Hp = layout.hidden_padded;
  const int K = kGates * Hp;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, g = lane / 4, t4 = lane % 4;
  const int rank = blockIdx.x % layout.cluster, tile = blockIdx.x / layout.cluster, dir = blockIdx.y;
  const int unit = (rank * layout.warps + warp) * kUnitsPerWarp + 2 * t4;
  const bool unit_ok[2] = {unit < H, unit + 1 < H};
  const bool paired = problem.paired;
  const ThreadRows<MT> rows(tile, g, B, T, a.lengths);

  typename Policy::template Weights<1, kGates * kMaxHidden> weights;
  Policy::load(weights, BackwardWeights<Elem, S>{a.w_hh + static_cast<int64_t>(dir) * G * H, H, Hp}, K, smem,
               layout.w_stride, layout.warps, rank);

  Operand* tiles = reinterpret_cast<Operand*>(smem + layout.a_offset);
  const int tile_elems = kTileRows * MT * layout.a_stride;

  // dh, dc: gradients flowing into the state after the current step; c_t: the cell of the current step;
  // c_first: c0, the cell before each row's first step.
  S dh[R][2], dc[R][2], c_t[R][2], c_first[R][2];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const bool io0 = rows.valid[i] && unit_ok[0], io1 = rows.valid[i] && unit_ok[1];
    const int64_t at = (static_cast<int64_t>(dir) * B + rows.batch[i]) * H + unit;
    unpack(load_pair(a.grad_h_n + at, io0, io1, paired), dh[i][0], dh[i][1]);
    unpack(load_pair(a.grad_c_n + at, io0, io1, paired), dc[i][0], dc[i][1]);
    unpack(load_pair(a.c0 + at, io0, io1, paired), c_first[i][0], c_first[i][1]);
    const bool runs_last = T - 1 < rows.length[i];
    const int64_t last = step_row(dir, T, rows.time(i, T - 1, dir), B, rows.batch[i]);
    unpack(load_pair(a.cell + last * H + unit, runs_last && unit_ok[0], runs_last && unit_ok[1], paired), c_t[i][0],
           c_t[i][1]);
  }

  // What step s reads, loaded one step ahead: its gates and grad_y, and the cell of the step processed
  // before it (its c_{t-1}), which is also the next iteration's c_t.
  StatePair gates_in[R][kGates], cell_prev_in[R];
  ElemPair grad_y_in[R];
  auto load_step = [&](int s) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const bool runs = s < rows.length[i];
      const bool ok0 = runs && unit_ok[0], ok1 = runs && unit_ok[1];
      const int64_t row = step_row(dir, T, rows.time(i, s, dir), B, rows.batch[i]);
#pragma unroll
      for (int gate = 0; gate < kGates; ++gate) {
        gates_in[i][gate] = load_pair(a.gates + row * G + gate * H + unit, ok0, ok1, paired);
      }
      grad_y_in[i] = load_pair(a.grad_y + row * H + unit, ok0, ok1, paired);
      const bool has_prev = s >= 1 && s - 1 < rows.length[i];
      const int64_t prev = step_row(dir, T, rows.time(i, s >= 1 ? s - 1 : 0, dir), B, rows.batch[i]);
      cell_prev_in[i] =
          load_pair(a.cell + prev * H + unit, has_prev && unit_ok[0], has_prev && unit_ok[1], paired);
    }
  };
  load_step(T - 1);
  step_barrier(layout.cluster);  // shared weights written; every CTA of the cluster running

  for (int s = T - 1; s >= 0; --s) {
    S dgate[R][kGates][2];
#pragma unroll
    for (int i = 0; i < R; ++i) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool active = s < rows.length[i] && unit_ok[e];
        const S ig = component<StatePair, S>(gates_in[i][0], e);
        const S fg = component<StatePair, S>(gates_in[i][1], e);
        const S gg = component<StatePair, S>(gates_in[i][2], e);
        const S og = component<StatePair, S>(gates_in[i][3], e);
        const S c_prev = s == 0 ? c_first[i][e] : component<StatePair, S>(cell_prev_in[i], e);
        const S dh_t = static_cast<S>(component<ElemPair, Wide>(grad_y_in[i], e)) + dh[i][e];
        const S tanh_c = Act::tanh(c_t[i][e]);
        const S dc_t = dc[i][e] + dh_t * og * (S(1) - tanh_c * tanh_c);
        dgate[i][0][e] = active ? dc_t * gg * ig * (S(1) - ig) : S(0);
        dgate[i][1][e] = active ? dc_t * c_prev * fg * (S(1) - fg) : S(0);
        dgate[i][2][e] = active ? dc_t * ig * (S(1) - gg * gg) : S(0);
        dgate[i][3][e] = active ? dh_t * tanh_c * og * (S(1) - og) : S(0);
        if (active) dc[i][e] = dc_t * fg;
        c_t[i][e] = c_prev;
      }
    }

    Operand* current = tiles + (s & 1) * tile_elems;
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int gate = 0; gate < kGates; ++gate) {
        publish(current + ThreadRows<MT>::local(i, g) * layout.a_stride + gate * Hp + unit,
                Policy::operands(dgate[i][gate][0], dgate[i][gate][1]), layout.cluster);
      }
    step_arrive(layout.cluster);
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const bool io0 = rows.valid[i] && unit_ok[0], io1 = rows.valid[i] && unit_ok[1];
      const int64_t row = step_row(dir, T, rows.time(i, s, dir), B, rows.batch[i]);
#pragma unroll
      for (int gate = 0; gate < kGates; ++gate) {
        store_pair(a.grad_xw + row * G + gate * H + unit, dgate[i][gate][0], dgate[i][gate][1], io0, io1, paired);
      }
    }
    // Only now, with the gate gradients stored, the next step's loads take their registers.
    if (s > 0) load_step(s - 1);
    step_wait(layout.cluster);

    S acc[MT][1][4];
    Policy::multiply(acc, weights, current, layout.a_stride, K);
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int i = 2 * m + half;
        if (s < rows.length[i]) {  // padded units: zero weights give zero, as they started
          dh[i][0] = acc[m][0][2 * half];
          dh[i][1] = acc[m][0][2 * half + 1];
        }
      }
  }

#pragma unroll
  for (int i = 0; i < R; ++i) {
    const bool io0 = rows.valid[i] && unit_ok[0], io1 = rows.valid[i] && unit_ok[1];
    const int64_t at = (static_cast<int64_t>(dir) * B + rows.batch[i]) * H + unit;
    store_pair(a.grad_h0 + at, dh[i][0], dh[i][1], io0, io1, paired);
    store_pair(a.grad_c0 + at, dc[i][0], dc[i][1], io0, io1, paired);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side: which policy runs which precision, the launch plan, and the launch.

template <Precision P>
struct PrecisionTraits;
template <>
struct PrecisionTraits<Precision::kBfloat16> {
  using Elem = __nv_bfloat16;
  using Forward = MmaPolicy<Bf16Mma, ApproxActivations, false>;
  using Backward = MmaPolicy<Bf16Mma, ApproxActivations, false>;
  static constexpr int kForwardTiles = 2;
  static constexpr int kBackwardTiles = 2;
};
template <>
struct PrecisionTraits<Precision::kFloat16> {
  using Elem = __half;
  using Forward = MmaPolicy<Fp16Mma, ExpActivations, false>;
  using Backward = MmaPolicy<Fp16Mma, ExpActivations, false>;
  static constexpr int kForwardTiles = 2;
  static constexpr int kBackwardTiles = 2;
};
template <>
struct PrecisionTraits<Precision::kTf32> {
  using Elem = float;
  using Forward = MmaPolicy<Fp16Mma, ExpActivations, true>;
  using Backward = MmaPolicy<Tf32Mma, ExpActivations, false>;
  static constexpr int kForwardTiles = 2;
  static constexpr int kBackwardTiles = 1;  // 128 weight registers leave no room for a second m-tile
};
template <>
struct PrecisionTraits<Precision::kFloat32> {
  using Elem = float;
  using Forward = FmaPolicy<float>;
  using Backward = FmaPolicy<float>;
  static constexpr int kForwardTiles = 1;
  static constexpr int kBackwardTiles = 1;
};
template <>
struct PrecisionTraits<Precision::kFloat64> {
  using Elem = double;
  using Forward = FmaPolicy<double>;
  using Backward = FmaPolicy<double>;
  static constexpr int kForwardTiles = 1;
  static constexpr int kBackwardTiles = 1;
};

struct DeviceLimits {
  int major;
  int multiprocessors;
  int shared_memory_optin;
};

inline cudaError_t query_device(DeviceLimits& limits) {
  int device = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&limits.major, cudaDevAttrComputeCapabilityMajor, device);
  if (error == cudaSuccess) {
    error = cudaDeviceGetAttribute(&limits.multiprocessors, cudaDevAttrMultiProcessorCount, device);
  }
  if (error == cudaSuccess) {
    error = cudaDeviceGetAttribute(&limits.shared_memory_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  return error;
}

inline int round_up(int x, int multiple) { return (x + multiple - 1) / multiple * multiple; }

struct LaunchShape {
  bool ok;
  Layout layout;
  size_t shared_bytes;
};

// The smallest cluster whose CTAs have at most kMaxWarps warps and whose shared memory fits the device.
// Row strides: the state tile's are 64 bytes off a multiple of 128 so that the 8 lanes of each quarter-warp
// 16-byte read (rows g, g+1 x 4 lanes) hit distinct banks; the FMA weights' rows are 16 bytes off, so that the
// 4 column pairs a quarter-warp reads do.
template <class Policy, int NT>
inline LaunchShape plan_shape(int hidden, int k_per_unit, int tiles, const DeviceLimits& device) {
  LaunchShape shape{};
  shape.ok = false;
  if (hidden < 1 || hidden > kMaxHidden) return shape;
  const int hp = round_up(hidden, kHiddenAlign);
  const int operand = static_cast<int>(sizeof(typename Policy::Operand));
  const int k_bytes = k_per_unit * hp * operand;
  const int a_row_bytes = round_up(k_bytes, 128) + 64;
  const int w_row_bytes = round_up(k_bytes, 128) + 16;
  const int total_warps = hp / kUnitsPerWarp;
  for (int cluster = 1; cluster <= kMaxCluster; cluster *= 2) {
    if (cluster > 1 && device.major < 9) break;
    if (total_warps % cluster != 0 || total_warps / cluster > kMaxWarps) continue;
    const int warps = total_warps / cluster;
    const size_t weight_bytes =
        Policy::kWeightsInSmem ? static_cast<size_t>(warps) * NT * kUnitsPerWarp * w_row_bytes : 0;
    const size_t bytes = weight_bytes + 2 * static_cast<size_t>(kTileRows) * tiles * a_row_bytes;
    if (bytes > static_cast<size_t>(device.shared_memory_optin)) continue;
    shape.ok = true;
    shape.layout = Layout{hp, cluster, warps, a_row_bytes / operand, w_row_bytes / operand,
                          static_cast<int>(weight_bytes)};
    shape.shared_bytes = bytes;
    return shape;
  }
  return shape;
}

template <Precision P>
inline LaunchShape forward_shape(int hidden, int tiles, const DeviceLimits& device) {
  return plan_shape<typename PrecisionTraits<P>::Forward, kGates>(hidden, 1, tiles, device);
}

template <Precision P>
inline LaunchShape backward_shape(int hidden, int tiles, const DeviceLimits& device) {
  return plan_shape<typename PrecisionTraits<P>::Backward, 1>(hidden, kGates, tiles, device);
}

// How many clusters of this shape the whole GPU holds at once.
template <typename Kernel>
inline cudaError_t resident_clusters(Kernel kernel, const LaunchShape& shape, const DeviceLimits& device,
                                     int& clusters) {
  clusters = 0;
  cudaError_t error =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shape.shared_bytes));
  if (error != cudaSuccess) return error;
  const int threads = shape.layout.warps * kWarpSize;
  if (shape.layout.cluster == 1) {
    int blocks = 0;
    error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, shape.shared_bytes);
    clusters = blocks * device.multiprocessors;
    return error;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(shape.layout.cluster, 1, 1);
  config.blockDim = dim3(threads, 1, 1);
  config.dynamicSmemBytes = shape.shared_bytes;
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = shape.layout.cluster;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return cudaOccupancyMaxActiveClusters(&clusters, kernel, &config);
}

// grid.x: the batch tiles' clusters, side by side; grid.y: the directions.
inline dim3 launch_grid(const LaunchShape& shape, int tiles, int batch, int directions) {
  const int batch_tiles = (batch + kTileRows * tiles - 1) / (kTileRows * tiles);
  return dim3(batch_tiles * shape.layout.cluster, directions, 1);
}

inline dim3 launch_block(const LaunchShape& shape) { return dim3(shape.layout.warps * kWarpSize, 1, 1); }

template <typename T>
inline bool pair_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (2 * sizeof(T)) == 0;
}

// Whether every pair of adjacent units is one aligned vector in global memory (load_pair / store_pair).
template <typename Elem, typename State>
inline bool paired_io(const RecurrenceForwardArgs<Elem, State>& a) {
  return a.hidden % 2 == 0 && pair_aligned(a.xw) && pair_aligned(a.h0) && pair_aligned(a.c0) && pair_aligned(a.y) &&
         pair_aligned(a.h_n) && pair_aligned(a.c_n) && pair_aligned(a.gates) && pair_aligned(a.cell);
}

template <typename Elem, typename State>
inline bool paired_io(const RecurrenceBackwardArgs<Elem, State>& a) {
  return a.hidden % 2 == 0 && pair_aligned(a.grad_y) && pair_aligned(a.grad_h_n) && pair_aligned(a.grad_c_n) &&
         pair_aligned(a.c0) && pair_aligned(a.gates) && pair_aligned(a.cell) && pair_aligned(a.grad_xw) &&
         pair_aligned(a.grad_h0) && pair_aligned(a.grad_c0);
}

template <typename Kernel, class Args>
inline cudaError_t launch_kernel(Kernel kernel, const LaunchShape& shape, int tiles, const Args& args,
                                 cudaStream_t stream) {
  cudaLaunchConfig_t config = {};
  config.gridDim = launch_grid(shape, tiles, args.batch, args.directions);
  config.blockDim = launch_block(shape);
  config.dynamicSmemBytes = shape.shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute = {};
  if (shape.layout.cluster > 1) {
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = shape.layout.cluster;
    attribute.val.clusterDim.y = 1;
    attribute.val.clusterDim.z = 1;
    config.attrs = &attribute;
    config.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&config, kernel, Problem<Args>{args, shape.layout, paired_io(args)});
}

// A candidate batch tile (MT m-tiles): its shape, and its cost in units of one m-tile step, counted as
// waves of resident clusters x MT (all clusters run the same T steps, so waves are real).
struct TileChoice {
  LaunchShape shape;
  int tiles;
  long long cost;
};

template <typename Kernel, class Args>
inline cudaError_t consider(Kernel kernel, const LaunchShape& shape, int tiles, const Args& args,
                            const DeviceLimits& device, TileChoice& best) {
  if (!shape.ok) return cudaSuccess;
  int resident = 0;
  const cudaError_t error = resident_clusters(kernel, shape, device, resident);
  if (error != cudaSuccess || resident == 0) return error;
  const long long clusters =
      static_cast<long long>(args.directions) * ((args.batch + kTileRows * tiles - 1) / (kTileRows * tiles));
  const long long cost = (clusters + resident - 1) / resident * tiles;
  // On a tie the larger tile wins: fewer steps in total, so less per-step latency.
  if (best.tiles == 0 || cost <= best.cost) best = TileChoice{shape, tiles, cost};
  return cudaSuccess;
}

template <Precision P, bool kForward>
struct KernelFor {
  using Traits = PrecisionTraits<P>;
  using Policy = typename std::conditional<kForward, typename Traits::Forward, typename Traits::Backward>::type;
  using Args = typename std::conditional<kForward, RecurrenceForwardArgs<typename Traits::Elem, typename Policy::State>,
                                         RecurrenceBackwardArgs<typename Traits::Elem, typename Policy::State>>::type;
  template <int MT>
  static constexpr auto get() {
    if constexpr (kForward) {
      return &lstm_forward_kernel<Policy, typename Traits::Elem, MT>;
    } else {
      return &lstm_backward_kernel<Policy, typename Traits::Elem, MT>;
    }
  }
  static constexpr int kMaxTiles = kForward ? Traits::kForwardTiles : Traits::kBackwardTiles;
  static LaunchShape shape(int hidden, int tiles, const DeviceLimits& device) {
    return kForward ? forward_shape<P>(hidden, tiles, device) : backward_shape<P>(hidden, tiles, device);
  }
};

template <Precision P, bool kForward>
inline cudaError_t launch(const typename KernelFor<P, kForward>::Args& args, cudaStream_t stream) {
  using K = KernelFor<P, kForward>;
  if (args.batch == 0 || args.directions == 0 || args.seq_len == 0) return cudaSuccess;
  DeviceLimits device{};
  cudaError_t error = query_device(device);
  if (error != cudaSuccess) return error;
  TileChoice best{};
  error = consider(K::template get<1>(), K::shape(args.hidden, 1, device), 1, args, device, best);
  if constexpr (K::kMaxTiles >= 2) {
    if (error == cudaSuccess) {
      error = consider(K::template get<2>(), K::shape(args.hidden, 2, device), 2, args, device, best);
    }
  }
  if (error != cudaSuccess) return error;
  if (best.tiles == 0) return cudaErrorInvalidConfiguration;
  if constexpr (K::kMaxTiles >= 2) {
    if (best.tiles == 2) return launch_kernel(K::template get<2>(), best.shape, 2, args, stream);
  }
  return launch_kernel(K::template get<1>(), best.shape, 1, args, stream);
}

}  // namespace detail
}  // namespace cuda
}  // namespace rnn_fast

// Defines the entry point NAME of lstm_recurrence.h; each lstm_<direction>_<precision>.cu holds one, so that
// every kernel instantiation compiles in its own translation unit.
#define RNN_FAST_RECURRENCE_ENTRY(NAME, PRECISION, FORWARD)                                                   \
  namespace rnn_fast {                                                                                        \
  namespace cuda {                                                                                            \
  cudaError_t NAME(const typename detail::KernelFor<PRECISION, FORWARD>::Args& args, cudaStream_t stream) { \
    return detail::launch<PRECISION, FORWARD>(args, stream);                                                 \
  }                                                                                                           \
  }                                                                                                           \
  }
