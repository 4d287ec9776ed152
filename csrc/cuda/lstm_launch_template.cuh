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
#include <map>
#include <mutex>
#include <tuple>
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

// How a step's new state tile reaches every CTA of the cluster: publish() each value into tile `buffer`, then
// arrive(buffer); wait(buffer) returns once every CTA's values of that step are in this CTA's tile. Between
// arrive and wait the step's global stores overlap the exchange.
//
// Baseline: DSMEM stores and one barrier.cluster arrive/wait per step. Its release/acquire compiles to a GPU-wide
// MEMBAR before every arrive, which waits for the step's global stores and prefetched loads as well.
struct BarrierExchange {
  int cluster;
  __device__ __forceinline__ BarrierExchange(unsigned char*, int cluster_size, int, uint32_t)
      : cluster(cluster_size) {}
  template <typename Raw>
  __device__ __forceinline__ void publish(void* local, Raw v, int) const {
    detail::publish(local, v, cluster);
  }
  __device__ __forceinline__ void arrive(int) const { step_arrive(cluster); }
  __device__ __forceinline__ void wait(int) const { step_wait(cluster); }
};

// kClusterMbarrier: one mbarrier per state tile in every CTA. A thread writes its values into its own CTA's tile
// with plain stores and into each peer's with st.async, which completes that many bytes on the peer's mbarrier;
// each warp then arrives once on its own CTA's (thread 0 also announces the bytes the peers will send). A CTA
// waits on its own mbarrier only: no cluster-wide barrier and no fence in the step loop. Two tiles suffice: a
// CTA overwrites a peer's tile of step s-1 only after it has received the peer's values of step s, which the
// peer computed after reading that tile. The last step publishes nothing, so no st.async is in flight into a
// CTA that has exited.
struct MbarrierExchange {
  int cluster, rank;
  uint32_t barriers;    // shared::cta address of tile 0's mbarrier; tile 1's follows
  uint32_t peer_bytes;  // bytes the peers write into one tile of this CTA per step
  uint32_t parity;      // bit b: the parity of the phase the next wait on tile b waits for

  // `bytes_per_thread`: what one thread publishes per step.
  __device__ __forceinline__ MbarrierExchange(unsigned char* barrier_memory, int cluster_size, int cta_rank,
                                              uint32_t bytes_per_thread)
      : cluster(cluster_size), rank(cta_rank), barriers(0), parity(0) {
    peer_bytes = static_cast<uint32_t>(cluster - 1) * blockDim.x * bytes_per_thread;
    if (cluster == 1) return;
#if RNN_FAST_HAS_CLUSTERS
    barriers = shared_address(barrier_memory);
    if (threadIdx.x == 0) {
      const int warps = static_cast<int>(blockDim.x) / kWarpSize;
      mbarrier_init(barriers, warps);
      mbarrier_init(barriers + 8, warps);
      fence_mbarrier_init();  // published to the peers by the kernel's first cluster barrier
    }
#endif
  }

  template <typename Raw>
  __device__ __forceinline__ void publish(void* local, Raw v, int buffer) const {
    *reinterpret_cast<Raw*>(local) = v;
    if (cluster == 1) return;
#if RNN_FAST_HAS_CLUSTERS
    const uint32_t addr = shared_address(local), barrier = barriers + 8 * buffer;
    // Staggered, rank+1 first, so that the CTAs do not all write to one peer first; counted without %, which
    // would be an integer division per store.
    for (int peer = 1, target = rank + 1; peer < cluster; ++peer, ++target) {
      if (target == cluster) target = 0;
      store_async(cluster_address(addr, target), v, cluster_address(barrier, target));
    }
#else
    __trap();
#endif
  }

  __device__ __forceinline__ void arrive(int buffer) const {
    if (cluster == 1) {
      __syncthreads();
      return;
    }
#if RNN_FAST_HAS_CLUSTERS
    __syncwarp();  // the warp's local stores, before its one release
    if (threadIdx.x % kWarpSize == 0) {
      const uint32_t barrier = barriers + 8 * buffer;
      if (threadIdx.x == 0) {
        mbarrier_arrive_expect_tx(barrier, peer_bytes);
      } else {
        mbarrier_arrive(barrier);
      }
    }
#else
    __trap();
#endif
  }

  __device__ __forceinline__ void wait(int buffer) {
    if (cluster == 1) return;
#if RNN_FAST_HAS_CLUSTERS
    mbarrier_wait_parity(barriers + 8 * buffer, (parity >> buffer) & 1u);
    parity ^= 1u << buffer;
#else
    __trap();
#endif
  }
};

template <bool kMbarrier>
using Exchange = typename std::conditional<kMbarrier, MbarrierExchange, BarrierExchange>::type;

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

// ---------------------------------------------------------------------------------------------------------
// Which policy runs which precision, and what a variant set changes.

// bf16 and fp16 multiply in their own type, forward and backward.
template <class Op>
struct HalfTraits {
  using Elem = typename Op::Operand;
  template <bool kApprox>
  using Forward = MmaPolicy<Op, ReducedActivations<kApprox>, false>;
  template <bool kApprox>
  using Backward = Forward<kApprox>;
  template <bool kApprox>
  using BackwardWide = Backward<kApprox>;
  static constexpr int kForwardTiles = 2;
  static constexpr int kBackwardTiles = 2;
};

// IEEE float32 and float64: FMAs, exact activations, no variant of the arithmetic.
template <typename S>
struct FmaTraits {
  using Elem = S;
  template <bool>
  using Forward = FmaPolicy<S>;
  template <bool>
  using Backward = FmaPolicy<S>;
  template <bool>
  using BackwardWide = FmaPolicy<S>;
  static constexpr int kForwardTiles = 1;
  static constexpr int kBackwardTiles = 1;
};

template <Precision P>
struct PrecisionTraits;
template <>
struct PrecisionTraits<Precision::kBfloat16> : HalfTraits<Bf16Mma> {};
template <>
struct PrecisionTraits<Precision::kFloat16> : HalfTraits<Fp16Mma> {};
template <>
struct PrecisionTraits<Precision::kTf32> {
  using Elem = float;
  template <bool kApprox>
  using Forward = MmaPolicy<Fp16Mma, ReducedActivations<kApprox>, true>;
  template <bool kApprox>
  using Backward = MmaPolicy<Tf32Mma, ReducedActivations<kApprox>, false>;
  // kBackwardTf32Wide: half of K (256 of the 512 at H=128) in registers, 64 of them instead of 128, the rest in
  // shared memory. All of it there would not fit next to two 32-row state tiles (128 + 132 KiB).
  template <bool kApprox>
  using BackwardWide = MmaPolicy<Tf32Mma, ReducedActivations<kApprox>, false, 2 * kMaxHidden>;
  static constexpr int kForwardTiles = 2;
  static constexpr int kBackwardTiles = 1;  // 128 weight registers leave no room for a second m-tile
};
template <>
struct PrecisionTraits<Precision::kFloat32> : FmaTraits<float> {};
template <>
struct PrecisionTraits<Precision::kFloat64> : FmaTraits<double> {};

// The kernels of precision P under variant set V (cut down to applicable_variants).
template <Precision P, unsigned V>
struct Config {
  using Traits = PrecisionTraits<P>;
  using Elem = typename Traits::Elem;
  static constexpr bool kMbarrier = (V & kClusterMbarrier) != 0;
  static constexpr bool kApprox = (V & kTanhApprox) != 0;
  static constexpr bool kWide = (V & kBackwardTf32Wide) != 0;
  static constexpr bool kPrefetch = (V & kBackwardPrefetch) != 0;
  using ForwardPolicy = typename Traits::template Forward<kApprox>;
  template <int MT>
  using BackwardPolicy = typename std::conditional<kWide && MT == 2, typename Traits::template BackwardWide<kApprox>,
                                                   typename Traits::template Backward<kApprox>>::type;
  using State = typename ForwardPolicy::State;
  using Saved = typename std::conditional<(V & kSaved16bit) != 0, typename SavedHalf<P>::type, State>::type;
  static constexpr int kForwardTiles = Traits::kForwardTiles;
  static constexpr int kBackwardTiles = kWide ? 2 : Traits::kBackwardTiles;
  // The 32-row TF32 backward leaves no shared memory for the input slots: it loads as the baseline does.
  static constexpr bool ring(int MT) { return kPrefetch && !(kWide && MT == 2); }
};

template <Precision P, Pass kPass, typename Saved>
using PassArgs = typename std::conditional<kPass == Pass::kBackward,
                                           RecurrenceBackwardArgs<typename PrecisionTraits<P>::Elem, Saved>,
                                           RecurrenceForwardArgs<typename PrecisionTraits<P>::Elem, Saved>>::type;

template <Precision P, unsigned V, Pass kPass>
using ConfigArgs = PassArgs<P, kPass, typename Config<P, V>::Saved>;

// Variant kernels are compiled for sm_90 only (the launcher runs them nowhere else).
template <unsigned V>
constexpr bool kCompiledForThisArchitecture = V == 0 || RNN_FAST_HAS_CLUSTERS;

// ---------------------------------------------------------------------------------------------------------
// Forward kernel (kSaveState: also the saved gates and cells; without, the inference kernel).

template <Precision P, unsigned V, int MT, bool kSaveState>
__device__ __forceinline__ void forward_steps(const Problem<ConfigArgs<P, V, Pass::kForward>>& problem) {
  using C = Config<P, V>;
  using Policy = typename C::ForwardPolicy;
  using Elem = typename C::Elem;
  using S = typename Policy::State;
  using Operand = typename Policy::Operand;
  using Act = typename Policy::Activations;
  using ElemPair = typename PairOf<Elem>::type;
  using Raw = decltype(Policy::operands(S(), S()));
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
  const int steps = rows.tile_steps();

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

  Exchange<C::kMbarrier> exchange(smem + layout.barrier_offset, layout.cluster, rank, R * sizeof(Raw));

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
  if (steps > 0) load_xw(0);
  step_barrier(layout.cluster);  // tile 0, shared weights and mbarriers written; every CTA of the cluster running

  // The outputs of step s: y, and the saved gates (the accumulator layout) and cells.
  auto store_step = [&](int s, const S (&gates_out)[MT][NT][4], const S (&cell_out)[R][2], const S (&y_out)[R][2]) {
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int i = 2 * m + half;
        const bool io0 = rows.valid[i] && unit_ok[0], io1 = rows.valid[i] && unit_ok[1];
        const int64_t row = step_row(dir, T, rows.time(i, s, dir), B, rows.batch[i]);
        if constexpr (kSaveState) {
#pragma unroll
          for (int gate = 0; gate < NT; ++gate) {
            store_pair(a.gates + row * G + gate * H + unit, gates_out[m][gate][2 * half],
                       gates_out[m][gate][2 * half + 1], io0, io1, paired);
          }
          store_pair(a.cell + row * H + unit, cell_out[i][0], cell_out[i][1], io0, io1, paired);
        }
        store_pair(a.y + row * H + unit, y_out[i][0], y_out[i][1], io0, io1, paired);
      }
  };

  for (int s = 0; s < steps; ++s) {
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
    const bool more = s + 1 < steps;
    if (more) load_xw(s + 1);

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

    // h enters every CTA's next tile; rows that stopped keep their last h, which only their own row reads. The
    // last step has no next tile.
    const int next = (s + 1) & 1;
    if (more) {
      Operand* next_tile = tiles + next * tile_elems;
#pragma unroll
      for (int i = 0; i < R; ++i) {
        exchange.publish(next_tile + ThreadRows<MT>::local(i, g) * layout.a_stride + unit,
                         Policy::operands(h[i][0], h[i][1]), next);
      }
      exchange.arrive(next);
    }
    store_step(s, acc, cell_out, y_out);
    if (more) exchange.wait(next);
  }

  // Steps past the tile's longest row: padding for every row, so zeros.
  if (steps < T) {
    S zero_gates[MT][NT][4], zero[R][2];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int gate = 0; gate < NT; ++gate)
#pragma unroll
        for (int col = 0; col < 4; ++col) zero_gates[m][gate][col] = S(0);
#pragma unroll
    for (int i = 0; i < R; ++i) zero[i][0] = zero[i][1] = S(0);
    for (int s = steps; s < T; ++s) store_step(s, zero_gates, zero, zero);
  }

#pragma unroll
  for (int i = 0; i < R; ++i) {
    const bool io0 = rows.valid[i] && unit_ok[0], io1 = rows.valid[i] && unit_ok[1];
    const int64_t at = (static_cast<int64_t>(dir) * B + rows.batch[i]) * H + unit;
    store_pair(a.h_n + at, h[i][0], h[i][1], io0, io1, paired);
    store_pair(a.c_n + at, c[i][0], c[i][1], io0, io1, paired);
  }
}

template <Precision P, unsigned V, int MT, bool kSaveState>
__global__ void __launch_bounds__(kMaxThreads, 1)
    lstm_forward_kernel(const Problem<ConfigArgs<P, V, Pass::kForward>> problem) {
  if constexpr (kCompiledForThisArchitecture<V>) {
    forward_steps<P, V, MT, kSaveState>(problem);
  } else {
    __trap();
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward kernel: processing steps in reverse; per step the elementwise gate gradients of the thread's
// (row, unit) pairs, published to the cluster, then dh = dgates @ W_hh for the thread's pairs.

// Where step s's inputs of a thread's row i are: its 4 saved gates and grad_y at the step's position, and the
// cell of the step processed before it (its c_{t-1}; none at s == 0, where it is c0).
template <class Args, int MT>
struct StepInputs {
  const Args& a;
  const ThreadRows<MT>& rows;
  int dir, unit;
  bool unit_ok[2], paired;
  __device__ __forceinline__ int64_t row(int i, int s) const {
    return step_row(dir, a.seq_len, rows.time(i, s, dir), a.batch, rows.batch[i]);
  }
  __device__ __forceinline__ bool runs(int i, int s, int e) const { return s < rows.length[i] && unit_ok[e]; }
  __device__ __forceinline__ bool has_prev(int i, int s, int e) const {
    return s >= 1 && s - 1 < rows.length[i] && unit_ok[e];
  }
  __device__ __forceinline__ decltype(Args::gates) gate(int i, int s, int gate) const {
    return a.gates + row(i, s) * (kGates * a.hidden) + gate * a.hidden + unit;
  }
  __device__ __forceinline__ decltype(Args::grad_y) grad_y(int i, int s) const {
    return a.grad_y + row(i, s) * a.hidden + unit;
  }
  __device__ __forceinline__ decltype(Args::cell) cell_prev(int i, int s) const {
    return a.cell + row(i, s >= 1 ? s - 1 : 0) * a.hidden + unit;
  }
};

// Baseline: what step s reads, loaded into registers one step ahead, after the step's gate-gradient stores have
// freed theirs.
template <typename Saved, typename Elem, int R>
struct RegisterInputs {
  using SavedPair = typename PairOf<Saved>::type;
  using ElemPair = typename PairOf<Elem>::type;
  SavedPair gates_in[R][kGates], cell_prev_in[R];
  ElemPair grad_y_in[R];

  __device__ __forceinline__ RegisterInputs(unsigned char*, const Layout&) {}
  template <class Where>
  __device__ __forceinline__ void load(const Where& at, int s) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const bool ok0 = at.runs(i, s, 0), ok1 = at.runs(i, s, 1);
#pragma unroll
      for (int gate = 0; gate < kGates; ++gate) gates_in[i][gate] = load_pair(at.gate(i, s, gate), ok0, ok1, at.paired);
      grad_y_in[i] = load_pair(at.grad_y(i, s), ok0, ok1, at.paired);
      cell_prev_in[i] = load_pair(at.cell_prev(i, s), at.has_prev(i, s, 0), at.has_prev(i, s, 1), at.paired);
    }
  }
  template <class Where>
  __device__ __forceinline__ void start(const Where& at, int first) {
    load(at, first);
  }
  __device__ __forceinline__ void ready(int) {}
  // After step s (processing index q) has stored its gate gradients.
  template <class Where>
  __device__ __forceinline__ void next(const Where& at, int s, int) {
    if (s > 0) load(at, s - 1);
  }
  __device__ __forceinline__ SavedPair gate(int i, int gate) const { return gates_in[i][gate]; }
  __device__ __forceinline__ ElemPair grad_y(int i) const { return grad_y_in[i]; }
  __device__ __forceinline__ SavedPair cell_prev(int i) const { return cell_prev_in[i]; }
};

// kBackwardPrefetch: step s's inputs are copied (cp.async) into one of `ring_slots` shared-memory slots
// ring_slots-1 steps ahead, and read from there when the step runs, so no register holds them across the MMA.
// A slot holds, per thread, 6 pairs per row (4 gates, grad_y, the previous cell), laid out [pair][thread] so that a
// warp's accesses are contiguous. Each thread reads only what it copied itself: cp.async.wait_group is the only
// synchronisation. Elements a step does not run are zeros stored directly; so are unpaired (odd-H) ones, loaded
// synchronously, since cp.async copies at least 4 bytes.
template <typename Saved, typename Elem, int R>
struct RingInputs {
  using SavedPair = typename PairOf<Saved>::type;
  using ElemPair = typename PairOf<Elem>::type;
  static constexpr int kPairsPerRow = kGates + 2;
  static constexpr int kPairBytes = sizeof(SavedPair) > sizeof(ElemPair) ? sizeof(SavedPair) : sizeof(ElemPair);
  static constexpr int kBytesPerThread = R * kPairsPerRow * kPairBytes;  // one slot
  unsigned char* base;
  int slots, current;

  __device__ __forceinline__ RingInputs(unsigned char* smem, const Layout& layout)
      : base(smem + layout.ring_offset), slots(layout.ring_slots), current(0) {}

  __device__ __forceinline__ unsigned char* at_slot(int slot, int i, int pair) const {
    return base + ((static_cast<int>(slot * R + i) * kPairsPerRow + pair) * static_cast<int>(blockDim.x) +
                   static_cast<int>(threadIdx.x)) *
                      kPairBytes;
  }
  template <typename T>
  __device__ __forceinline__ void fill(unsigned char* dst, const T* src, bool ok0, bool ok1, bool paired) {
    using Pair = typename PairOf<T>::type;
    if (paired && ok0) {
      cp_async(dst, src, sizeof(Pair));
    } else {
      *reinterpret_cast<Pair*>(dst) = load_pair(src, ok0, ok1, paired);  // load_pair reads nothing that is not ok
    }
  }
  template <class Where>
  __device__ __forceinline__ void issue(const Where& at, int s, int slot) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const bool ok0 = at.runs(i, s, 0), ok1 = at.runs(i, s, 1);
#pragma unroll
      for (int gate = 0; gate < kGates; ++gate) fill(at_slot(slot, i, gate), at.gate(i, s, gate), ok0, ok1, at.paired);
      fill(at_slot(slot, i, kGates), at.grad_y(i, s), ok0, ok1, at.paired);
      fill(at_slot(slot, i, kGates + 1), at.cell_prev(i, s), at.has_prev(i, s, 0), at.has_prev(i, s, 1), at.paired);
    }
  }
  // Steps first, first-1, ... into slots 0, 1, ...: one commit group per step, ring_slots-1 of them.
  template <class Where>
  __device__ __forceinline__ void start(const Where& at, int first) {
    for (int q = 0; q + 1 < slots; ++q) {
      if (first - q >= 0) issue(at, first - q, q);
      cp_async_commit();
    }
  }
  // Step q's group has landed once at most the ring_slots-2 newer ones are in flight.
  __device__ __forceinline__ void ready(int q) {
    cp_async_wait(slots - 2);
    current = q % slots;
  }
  // Step s - (ring_slots-1) into the slot step q-1 has finished reading.
  template <class Where>
  __device__ __forceinline__ void next(const Where& at, int s, int q) {
    const int ahead = s - (slots - 1);
    if (ahead >= 0) issue(at, ahead, (q + slots - 1) % slots);
    cp_async_commit();  // possibly empty, so that every step waits for the same count
  }
  __device__ __forceinline__ SavedPair gate(int i, int gate) const {
    return *reinterpret_cast<const SavedPair*>(at_slot(current, i, gate));
  }
  __device__ __forceinline__ ElemPair grad_y(int i) const {
    return *reinterpret_cast<const ElemPair*>(at_slot(current, i, kGates));
  }
  __device__ __forceinline__ SavedPair cell_prev(int i) const {
    return *reinterpret_cast<const SavedPair*>(at_slot(current, i, kGates + 1));
  }
};

template <Precision P, unsigned V, int MT>
using BackwardInputs = typename std::conditional<Config<P, V>::ring(MT),
                                                 RingInputs<typename Config<P, V>::Saved, typename Config<P, V>::Elem, 2 * MT>,
                                                 RegisterInputs<typename Config<P, V>::Saved, typename Config<P, V>::Elem, 2 * MT>>::type;

template <Precision P, unsigned V, int MT>
__device__ __forceinline__ void backward_steps(const Problem<ConfigArgs<P, V, Pass::kBackward>>& problem) {
  using C = Config<P, V>;
  using Policy = typename C::template BackwardPolicy<MT>;
  using Elem = typename C::Elem;
  using Saved = typename C::Saved;
  using S = typename Policy::State;
  using Operand = typename Policy::Operand;
  using Act = typename Policy::Activations;
  using SavedPair = typename PairOf<Saved>::type;
  using ElemPair = typename PairOf<Elem>::type;
  using Wide = decltype(widen(std::declval<Elem>()));  // Elem's arithmetic type
  using Raw = decltype(Policy::operands(S(), S()));
  using Args = ConfigArgs<P, V, Pass::kBackward>;
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
  const int steps = rows.tile_steps();

  typename Policy::template Weights<1, kGates * kMaxHidden> weights;
  Policy::load(weights, BackwardWeights<Elem, S>{a.w_hh + static_cast<int64_t>(dir) * G * H, H, Hp}, K, smem,
               layout.w_stride, layout.warps, rank);

  Operand* tiles = reinterpret_cast<Operand*>(smem + layout.a_offset);
  const int tile_elems = kTileRows * MT * layout.a_stride;
  const StepInputs<Args, MT> where{a, rows, dir, unit, {unit_ok[0], unit_ok[1]}, paired};

  // Steps past the tile's longest row: padding for every row, zero gate gradients.
  for (int s = steps; s < T; ++s) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const bool io0 = rows.valid[i] && unit_ok[0], io1 = rows.valid[i] && unit_ok[1];
#pragma unroll
      for (int gate = 0; gate < kGates; ++gate) {
        store_pair(a.grad_xw + where.row(i, s) * G + gate * H + unit, S(0), S(0), io0, io1, paired);
      }
    }
  }

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
    const int last = steps > 0 ? steps - 1 : 0;
    unpack(load_pair(a.cell + where.row(i, last) * H + unit, where.runs(i, last, 0), where.runs(i, last, 1), paired),
           c_t[i][0], c_t[i][1]);
  }

  Exchange<C::kMbarrier> exchange(smem + layout.barrier_offset, layout.cluster, rank, R * kGates * sizeof(Raw));
  BackwardInputs<P, V, MT> inputs(smem, layout);
  if (steps > 0) inputs.start(where, steps - 1);
  step_barrier(layout.cluster);  // shared weights and mbarriers written; every CTA of the cluster running

  for (int s = steps - 1; s >= 0; --s) {
    const int q = steps - 1 - s, buffer = q & 1;  // q: processing index
    inputs.ready(q);
    S dgate[R][kGates][2];
#pragma unroll
    for (int i = 0; i < R; ++i) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool active = s < rows.length[i] && unit_ok[e];
        const S ig = component<SavedPair, S>(inputs.gate(i, 0), e);
        const S fg = component<SavedPair, S>(inputs.gate(i, 1), e);
        const S gg = component<SavedPair, S>(inputs.gate(i, 2), e);
        const S og = component<SavedPair, S>(inputs.gate(i, 3), e);
        const S c_prev = s == 0 ? c_first[i][e] : component<SavedPair, S>(inputs.cell_prev(i), e);
        const S dh_t = static_cast<S>(component<ElemPair, Wide>(inputs.grad_y(i), e)) + dh[i][e];
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

    Operand* current = tiles + buffer * tile_elems;
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int gate = 0; gate < kGates; ++gate) {
        exchange.publish(current + ThreadRows<MT>::local(i, g) * layout.a_stride + gate * Hp + unit,
                         Policy::operands(dgate[i][gate][0], dgate[i][gate][1]), buffer);
      }
    exchange.arrive(buffer);
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const bool io0 = rows.valid[i] && unit_ok[0], io1 = rows.valid[i] && unit_ok[1];
      const int64_t row = where.row(i, s);
#pragma unroll
      for (int gate = 0; gate < kGates; ++gate) {
        store_pair(a.grad_xw + row * G + gate * H + unit, dgate[i][gate][0], dgate[i][gate][1], io0, io1, paired);
      }
    }
    // Only now, with the gate gradients stored, the next step's loads take their registers.
    inputs.next(where, s, q);
    exchange.wait(buffer);

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

template <Precision P, unsigned V, int MT>
__global__ void __launch_bounds__(kMaxThreads, 1)
    lstm_backward_kernel(const Problem<ConfigArgs<P, V, Pass::kBackward>> problem) {
  if constexpr (kCompiledForThisArchitecture<V>) {
    backward_steps<P, V, MT>(problem);
  } else {
    __trap();
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side: the launch plan, its cache, and the launch.

struct DeviceLimits {
  int major;
  int multiprocessors;
  int shared_memory_optin;
};

inline cudaError_t query_device(int device, DeviceLimits& limits) {
  cudaError_t error = cudaDeviceGetAttribute(&limits.major, cudaDevAttrComputeCapabilityMajor, device);
  if (error == cudaSuccess) {
    error = cudaDeviceGetAttribute(&limits.multiprocessors, cudaDevAttrMultiProcessorCount, device);
  }
  if (error == cudaSuccess) {
    error = cudaDeviceGetAttribute(&limits.shared_memory_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  return error;
}

inline cudaError_t query_device(DeviceLimits& limits) {
  int device = 0;
  const cudaError_t error = cudaGetDevice(&device);
  return error == cudaSuccess ? query_device(device, limits) : error;
}

inline int round_up(int x, int multiple) { return (x + multiple - 1) / multiple * multiple; }

struct LaunchShape {
  bool ok;
  Layout layout;
  size_t shared_bytes;
};

// Shared memory a variant adds: the two mbarriers, and the backward's input slots (bytes per thread and slot).
struct SharedExtras {
  bool barriers;
  int ring_bytes_per_thread;
};

constexpr int kMaxRingSlots = 4;  // kBackwardPrefetch: inputs up to 3 steps ahead
constexpr int kBarrierBytes = 16;

// The smallest cluster whose CTAs have at most kMaxWarps warps and whose shared memory fits the device.
// Row strides: the state tile's are 64 bytes off a multiple of 128 so that the 8 lanes of each quarter-warp
// 16-byte read (rows g, g+1 x 4 lanes) hit distinct banks; the FMA weights' rows are 16 bytes off, so that the
// 4 column pairs a quarter-warp reads do. The input slots take what is left, up to kMaxRingSlots; fewer than 2
// (the baseline's one step ahead) leave the shape unfit.
template <class Policy, int NT>
inline LaunchShape plan_shape(int hidden, int k_per_unit, int tiles, const DeviceLimits& device,
                              const SharedExtras& extras) {
  LaunchShape shape{};
  shape.ok = false;
  if (hidden < 1 || hidden > kMaxHidden) return shape;
  const int hp = round_up(hidden, kHiddenAlign);
  const int operand = static_cast<int>(sizeof(typename Policy::Operand));
  const int k_bytes = k_per_unit * hp * operand;
  const int a_row_bytes = round_up(k_bytes, 128) + 64;
  const int w_row_bytes = round_up(k_bytes, 128) + 16;
  const int total_warps = hp / kUnitsPerWarp;
  const size_t optin = static_cast<size_t>(device.shared_memory_optin);
  for (int cluster = 1; cluster <= kMaxCluster; cluster *= 2) {
    if (cluster > 1 && device.major < 9) break;
    if (total_warps % cluster != 0 || total_warps / cluster > kMaxWarps) continue;
    const int warps = total_warps / cluster;
    const size_t weight_bytes = Policy::weight_smem_bytes(warps, NT, k_per_unit * hp, w_row_bytes);
    size_t bytes = weight_bytes + 2 * static_cast<size_t>(kTileRows) * tiles * a_row_bytes;
    const size_t barrier_bytes = extras.barriers ? kBarrierBytes : 0;
    const int ring_offset = static_cast<int>(bytes);
    int slots = 0;
    if (extras.ring_bytes_per_thread > 0) {
      const size_t slot_bytes = static_cast<size_t>(extras.ring_bytes_per_thread) * warps * kWarpSize;
      const size_t room = bytes + barrier_bytes < optin ? optin - bytes - barrier_bytes : 0;
      slots = static_cast<int>(room / slot_bytes < kMaxRingSlots ? room / slot_bytes : kMaxRingSlots);
      if (slots < 2) continue;
      bytes += slots * slot_bytes;
    }
    const int barrier_offset = static_cast<int>(bytes);
    bytes += barrier_bytes;
    if (bytes > optin) continue;
    shape.ok = true;
    shape.layout = Layout{hp, cluster, warps, a_row_bytes / operand, w_row_bytes / operand,
                          static_cast<int>(weight_bytes), ring_offset, slots, barrier_offset};
    shape.shared_bytes = bytes;
    return shape;
  }
  return shape;
}

// What precision P's kernels of pass kPass under variant set V look like.
template <Precision P, Pass kPass, unsigned V>
struct KernelFor {
  using C = Config<P, V>;
  static constexpr bool kBackward = kPass == Pass::kBackward;
  using Args = ConfigArgs<P, V, kPass>;
  template <int MT>
  static constexpr auto get() {
    if constexpr (kBackward) {
      return &lstm_backward_kernel<P, V, MT>;
    } else {
      return &lstm_forward_kernel<P, V, MT, kPass == Pass::kForward>;
    }
  }
  static constexpr int kMaxTiles = kBackward ? C::kBackwardTiles : C::kForwardTiles;
  // Variant kernels exist at the largest batch tile only, the one B=768 runs: every kernel costs seconds of nvcc
  // time, and the variants are there to be timed at that shape. The baseline has every tile.
  static constexpr int kMinTiles = V == 0 ? 1 : kMaxTiles;
  template <int MT>
  static LaunchShape shape_of(int hidden, const DeviceLimits& device) {
    if constexpr (kBackward) {
      using Ring = RingInputs<typename C::Saved, typename C::Elem, 2 * MT>;
      const SharedExtras extras{C::kMbarrier, C::ring(MT) ? Ring::kBytesPerThread : 0};
      return plan_shape<typename C::template BackwardPolicy<MT>, 1>(hidden, kGates, MT, device, extras);
    } else {
      return plan_shape<typename C::ForwardPolicy, kGates>(hidden, 1, MT, device, SharedExtras{C::kMbarrier, 0});
    }
  }
  static LaunchShape shape(int hidden, int tiles, const DeviceLimits& device) {
    if constexpr (kMaxTiles >= 2) {
      if (tiles == 2) return shape_of<2>(hidden, device);
    }
    return tiles == 1 && kMinTiles == 1 ? shape_of<1>(hidden, device) : LaunchShape{};
  }
};

template <Precision P>
inline LaunchShape forward_shape(int hidden, int tiles, const DeviceLimits& device) {
  return KernelFor<P, Pass::kForward, 0>::shape(hidden, tiles, device);
}

template <Precision P>
inline LaunchShape backward_shape(int hidden, int tiles, const DeviceLimits& device) {
  return KernelFor<P, Pass::kBackward, 0>::shape(hidden, tiles, device);
}

// `body(std::integral_constant<unsigned, V>{})` for the compiled variant set V equal to `variants` (cut down to
// applicable_variants), or cudaErrorNotSupported when the build has none: the one switch from a runtime variant
// set to the kernels' compile-time one.
template <Precision P, Pass kPass, class Body, size_t... I>
inline cudaError_t dispatch_variants(unsigned variants, Body&& body, std::index_sequence<I...>) {
  constexpr unsigned kApplicable = applicable_variants(P, kPass);
  cudaError_t result = cudaErrorNotSupported;
  const bool found =
      ((variants == (kCompiledVariantSets[I] & kApplicable) &&
        (result = body(std::integral_constant<unsigned, kCompiledVariantSets[I] & kApplicable>{}), true)) ||
       ...);
  (void)found;
  return result;
}

template <Precision P, Pass kPass, class Body>
inline cudaError_t dispatch_variants(unsigned variants, Body&& body) {
  constexpr size_t kSets = sizeof(kCompiledVariantSets) / sizeof(kCompiledVariantSets[0]);
  return dispatch_variants<P, kPass>(variants, static_cast<Body&&>(body), std::make_index_sequence<kSets>{});
}

// The occupancy queries, asked once per (device, kernel, shape) and kept: a launch then costs no driver query
// beyond cudaGetDevice and the launch itself. `Runtime` performs the queries (CudaRuntime below; the emulation
// tests count them with a stand-in). Thread-safe; a kernel's shared-memory attribute only ever grows, so a shape
// planned earlier with more shared memory still launches.
template <class Runtime>
class LaunchCache {
 public:
  cudaError_t device(int index, DeviceLimits& limits) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto found = devices_.find(index);
    if (found != devices_.end()) {
      limits = found->second;
      return cudaSuccess;
    }
    const cudaError_t error = Runtime::query_device(index, limits);
    if (error == cudaSuccess) devices_.emplace(index, limits);
    return error;
  }

  // How many clusters of `shape` the whole GPU holds at once.
  cudaError_t resident_clusters(int index, const void* kernel, const LaunchShape& shape, int multiprocessors,
                                int& clusters) {
    std::lock_guard<std::mutex> lock(mutex_);
    const ShapeKey key{index, kernel, shape.layout.cluster, shape.layout.warps, shape.shared_bytes};
    const auto found = resident_.find(key);
    if (found != resident_.end()) {
      clusters = found->second;
      return cudaSuccess;
    }
    size_t& attribute = shared_attribute_[KernelKey{index, kernel}];
    if (shape.shared_bytes > attribute) {
      const cudaError_t error = Runtime::set_shared_memory(index, kernel, shape.shared_bytes);
      if (error != cudaSuccess) return error;
      attribute = shape.shared_bytes;
    }
    const cudaError_t error = Runtime::resident_clusters(kernel, shape, multiprocessors, clusters);
    if (error == cudaSuccess) resident_.emplace(key, clusters);
    return error;
  }

 private:
  using KernelKey = std::pair<int, const void*>;
  using ShapeKey = std::tuple<int, const void*, int, int, size_t>;
  std::mutex mutex_;
  std::map<int, DeviceLimits> devices_;
  std::map<KernelKey, size_t> shared_attribute_;
  std::map<ShapeKey, int> resident_;
};

// Makes `config` launch clusters of `cluster` CTAs along x, through `attribute` (which must outlive it).
inline void set_cluster_dimension(cudaLaunchConfig_t& config, cudaLaunchAttribute& attribute, int cluster) {
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = cluster;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  config.attrs = &attribute;
  config.numAttrs = 1;
}

struct CudaRuntime {
  static cudaError_t query_device(int index, DeviceLimits& limits) { return detail::query_device(index, limits); }

  // On the current device, which is `index` (the launch asked cudaGetDevice).
  static cudaError_t set_shared_memory(int /*index*/, const void* kernel, size_t bytes) {
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  }

  static cudaError_t resident_clusters(const void* kernel, const LaunchShape& shape, int multiprocessors,
                                       int& clusters) {
    clusters = 0;
    const int threads = shape.layout.warps * kWarpSize;
    if (shape.layout.cluster == 1) {
      int blocks = 0;
      const cudaError_t error =
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, shape.shared_bytes);
      clusters = blocks * multiprocessors;
      return error;
    }
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(shape.layout.cluster, 1, 1);
    config.blockDim = dim3(threads, 1, 1);
    config.dynamicSmemBytes = shape.shared_bytes;
    cudaLaunchAttribute attribute = {};
    set_cluster_dimension(config, attribute, shape.layout.cluster);
    return cudaOccupancyMaxActiveClusters(&clusters, kernel, &config);
  }
};

inline LaunchCache<CudaRuntime>& launch_cache() {
  static LaunchCache<CudaRuntime> cache;
  return cache;
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

// Whether every pair of adjacent units is one aligned vector in global memory (load_pair / store_pair). The
// inference kernels' null gates and cells count as aligned.
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
  if (shape.layout.cluster > 1) set_cluster_dimension(config, attribute, shape.layout.cluster);
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
inline cudaError_t consider(Kernel kernel, const LaunchShape& shape, int tiles, const Args& args, int device_index,
                            const DeviceLimits& device, TileChoice& best) {
  if (!shape.ok) return cudaSuccess;
  int resident = 0;
  const cudaError_t error = launch_cache().resident_clusters(device_index, reinterpret_cast<const void*>(kernel),
                                                             shape, device.multiprocessors, resident);
  if (error != cudaSuccess || resident == 0) return error;
  const long long clusters =
      static_cast<long long>(args.directions) * ((args.batch + kTileRows * tiles - 1) / (kTileRows * tiles));
  const long long cost = (clusters + resident - 1) / resident * tiles;
  // On a tie the larger tile wins: fewer steps in total, so less per-step latency.
  if (best.tiles == 0 || cost <= best.cost) best = TileChoice{shape, tiles, cost};
  return cudaSuccess;
}

// The planner's tile choice for variant set V, and the launch.
template <Precision P, Pass kPass, unsigned V, class Args>
inline cudaError_t launch_variant(const Args& args, int device_index, const DeviceLimits& device,
                                  cudaStream_t stream) {
  using K = KernelFor<P, kPass, V>;
  if constexpr (!std::is_same<typename K::Args, Args>::value) {
    return cudaErrorNotSupported;  // V's saved-state type is not the args' (dispatch never gets here)
  } else {
    TileChoice best{};
    cudaError_t error = cudaSuccess;
    if constexpr (K::kMinTiles == 1) {
      error = consider(K::template get<1>(), K::shape(args.hidden, 1, device), 1, args, device_index, device, best);
    }
    if constexpr (K::kMaxTiles >= 2) {
      if (error == cudaSuccess) {
        error = consider(K::template get<2>(), K::shape(args.hidden, 2, device), 2, args, device_index, device, best);
      }
    }
    if (error != cudaSuccess) return error;
    if (best.tiles == 0) return cudaErrorInvalidConfiguration;
    if constexpr (K::kMaxTiles >= 2) {
      if (best.tiles == 2) return launch_kernel(K::template get<2>(), best.shape, 2, args, stream);
    }
    if constexpr (K::kMinTiles == 1) {
      return launch_kernel(K::template get<1>(), best.shape, 1, args, stream);
    } else {
      return cudaErrorInvalidConfiguration;
    }
  }
}

template <typename Elem, typename State>
constexpr bool saves_half(const RecurrenceForwardArgs<Elem, State>*) {
  return sizeof(State) == 2;
}
template <typename Elem, typename State>
constexpr bool saves_half(const RecurrenceBackwardArgs<Elem, State>*) {
  return sizeof(State) == 2;
}

template <Precision P, Pass kPass, class Args>
inline cudaError_t launch(const Args& args, unsigned variants, cudaStream_t stream) {
  if (args.batch == 0 || args.directions == 0 || args.seq_len == 0) return cudaSuccess;
  int device_index = 0;
  cudaError_t error = cudaGetDevice(&device_index);
  DeviceLimits device{};
  if (error == cudaSuccess) error = launch_cache().device(device_index, device);
  if (error != cudaSuccess) return error;
  // The saved-state type is the args', whatever the flag says.
  constexpr bool kHalf = saves_half(static_cast<const Args*>(nullptr));
  unsigned set = (variants & applicable_variants(P, kPass) & ~kSaved16bit) | (kHalf ? kSaved16bit : 0u);
  if (device.major < 9) {
    if (kHalf) return cudaErrorNotSupported;
    set = 0;  // variants are compiled for sm_90 only
  }
  return dispatch_variants<P, kPass>(set, [&](auto v) {
    return launch_variant<P, kPass, decltype(v)::value>(args, device_index, device, stream);
  });
}

}  // namespace detail
}  // namespace cuda
}  // namespace rnn_fast

// Defines the entry point NAME of lstm_recurrence.h for Precision::PRECISION, Pass::PASS and saved-state type
// SAVED; each lstm_<pass>_<precision>.cu holds the entries of one precision and pass, so that every kernel
// instantiation, variants included, compiles in the translation unit of its precision and pass.
#define RNN_FAST_RECURRENCE_ENTRY(NAME, PRECISION, PASS, SAVED)                                          \
  namespace rnn_fast {                                                                                   \
  namespace cuda {                                                                                       \
  cudaError_t NAME(const detail::PassArgs<Precision::PRECISION, Pass::PASS, SAVED>& args, unsigned variants, \
                   cudaStream_t stream) {                                                                \
    return detail::launch<Precision::PRECISION, Pass::PASS>(args, variants, stream);                    \
  }                                                                                                      \
  }                                                                                                      \
  }
