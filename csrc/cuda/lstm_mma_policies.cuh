// How a CTA multiplies its state tile by its slice of W_hh, and the activations that follow: tensor-core MMAs
// from weights held as B fragments (MmaPolicy, bf16 / fp16 / TF32) or plain FMAs from weights in shared memory
// (FmaPolicy, IEEE float32 / float64). Both kernels are written against either policy; lstm_kernel_traits.cuh
// says which precision gets which.
#pragma once

#include <type_traits>

#include "lstm_kernel_common.cuh"

namespace rnn_fast::cuda::detail {

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

// The activations of the tensor-core precisions: kTanhApprox picks MUFU.TANH.
template <bool kApprox>
using ReducedActivations = typename std::conditional<kApprox, ApproxActivations, ExpActivations>::type;

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

// Weights as MMA B fragments; tensor-core MMAs. kScaledRows: each column (a row of W_hh) is divided by a power
// of two at load and the accumulator multiplied back (the TF32-as-fp16 forward). The fragments of the first
// kRegisterK values of K live in registers; the rest, if any (kBackwardTf32Wide), in shared memory as
// [warp][n-tile][chunk][lane] 16-byte lane fragments, so that a warp's read of one chunk is 512 contiguous bytes.
template <class Op, class Act, bool kScaledRows, int kRegisterK = kGates * kMaxHidden>
struct MmaPolicy {
  using Operand = typename Op::Operand;
  using State = float;
  using Activations = Act;
  static constexpr int kLaneElems = kLaneBytes / sizeof(Operand);
  static constexpr int kChunkElems = 4 * kLaneElems;  // K per 64-byte chunk
  static constexpr int kChunkBytes = kWarpSize * kLaneBytes;

  // The chunks of k_total that live in shared memory.
  static __host__ __device__ __forceinline__ int shared_chunks(int k_total) {
    const int chunks = (k_total + kChunkElems - 1) / kChunkElems, in_registers = kRegisterK / kChunkElems;
    return chunks > in_registers ? chunks - in_registers : 0;
  }

  static size_t weight_smem_bytes(int warps, int NT, int k_total, int /*w_row_bytes*/) {
    return static_cast<size_t>(warps) * NT * shared_chunks(k_total) * kChunkBytes;
  }

  template <int NT, int kMaxK>
  struct Weights {
    static constexpr int kChunks = kMaxK / kChunkElems;
    static constexpr int kRegisterChunks = kChunks < kRegisterK / kChunkElems ? kChunks : kRegisterK / kChunkElems;
    uint4 frag[NT][kRegisterChunks];
    const uint4* shared;  // this warp's first shared chunk, at this lane
    int shared_stride;    // uint4s from one n-tile's shared chunks to the next's
    float column_scale[NT][2];
    __device__ __forceinline__ float scale(int nt, int e) const { return kScaledRows ? column_scale[nt][e] : 1.0f; }
    // j is a compile-time constant in the unrolled loops; the clamped index only keeps the dead branch in bounds.
    __device__ __forceinline__ uint4 fragment(int nt, int j) const {
      if (j < kRegisterChunks) return frag[nt][j < kRegisterChunks ? j : 0];
      return shared[nt * shared_stride + (j - kRegisterChunks) * kWarpSize];
    }
    __device__ __forceinline__ void set(int nt, int j, uint4 v) {
      if (j < kRegisterChunks) {
        frag[nt][j < kRegisterChunks ? j : 0] = v;
      } else {
        const_cast<uint4*>(shared)[nt * shared_stride + (j - kRegisterChunks) * kWarpSize] = v;
      }
    }
  };

  template <int NT, int kMaxK, class Fetch>
  static __device__ __forceinline__ void load(Weights<NT, kMaxK>& w, const Fetch& fetch, int k_total,
                                              unsigned char* smem, int /*w_stride*/, int warps, int rank) {
    const int lane = threadIdx.x % kWarpSize, g = lane / 4, t = lane % 4, warp = threadIdx.x / kWarpSize;
    const int unit = (rank * warps + warp) * kUnitsPerWarp + g;
    const int shared_chunks_used = shared_chunks(k_total);
    w.shared_stride = shared_chunks_used * kWarpSize;
    w.shared = reinterpret_cast<const uint4*>(smem) + warp * NT * w.shared_stride + lane;
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
        if (j * kChunkElems < k_total || j < Weights<NT, kMaxK>::kRegisterChunks) w.set(nt, j, pack_lane<Op>(v));
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
        uint4 b[NT];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) b[nt] = w.fragment(nt, j);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const unsigned char* p = base + (m * kTileRows) * row_bytes + j * 4 * kLaneBytes;
          const uint4 lo = *reinterpret_cast<const uint4*>(p);
          const uint4 hi = *reinterpret_cast<const uint4*>(p + 8 * row_bytes);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            Op::mma(part[j % kSplit][m][nt], lo.x, hi.x, lo.y, hi.y, b[nt].x, b[nt].y);
            Op::mma(part[j % kSplit][m][nt], lo.z, hi.z, lo.w, hi.w, b[nt].z, b[nt].w);
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
  static constexpr int kLaneElems = kLaneBytes / sizeof(S);
  static constexpr int kChunkElems = kLaneElems;

  static size_t weight_smem_bytes(int warps, int NT, int /*k_total*/, int w_row_bytes) {
    return static_cast<size_t>(warps) * NT * kUnitsPerWarp * w_row_bytes;
  }

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

}  // namespace rnn_fast::cuda::detail
