// How a step's new state reaches every CTA of the cluster (the design: lstm_kernel_common.cuh): DSMEM stores
// and barrier.cluster (the baseline), or st.async and mbarriers (kClusterMbarrier). Both kernels exchange
// through these, the forward its new h, the backward its gate gradients.
#pragma once

#include <type_traits>

#include "lstm_kernel_common.cuh"

namespace rnn_fast::cuda::detail {

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

}  // namespace rnn_fast::cuda::detail
