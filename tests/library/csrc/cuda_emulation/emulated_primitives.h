// CPU stand-ins for the CUDA built-ins and the PTX primitives of csrc/cuda/lstm_primitives.cuh, so that the
// unchanged kernels of lstm_{forward,backward}_kernel.cuh run on a CPU (no GPU is needed to check their indexing).
//
// Every CUDA thread of one cluster is a fiber (ucontext) on one OS thread; fibers switch only inside barriers
// and warp collectives, so a run is deterministic. The warp collectives (shuffles, mma.sync) are written from
// the PTX ISA's fragment definitions, independently of how the kernels arrange their operands. Shared memory
// starts as 0xFF bytes (NaN in every float type): a kernel that reads what it never wrote produces NaNs.
//
// Asynchronous operations land as late as the PTX ISA allows, so that a missing or early wait reads stale data:
// a cp.async at the cp.async.wait_group that retires its group; an st.async when the CTA that owns its mbarrier
// next waits on that mbarrier. A run where every thread waits and none can proceed aborts as a deadlock.
//
// Included by lstm_kernel_common.cuh through -DRNN_FAST_PRIMITIVES_HEADER='"emulated_primitives.h"'.
#pragma once

#include <ucontext.h>

#include <array>
#include <map>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <math.h>  // the float overloads of fma & co. in the global namespace, as device code has them
#include <vector>

#define __launch_bounds__(...)
#define RNN_FAST_HAS_CLUSTERS 1

namespace emu {

// Threads waiting for each other: `expected` arrivals complete a generation.
struct Rendezvous {
  int expected = 0;
  int arrived = 0;
  unsigned generation = 0;
};

// A copy that has been issued and has not landed yet.
struct Copy {
  void* dst;
  const void* src;
  int bytes;
};

struct Fiber {
  uint3 thread_idx;
  uint3 block_idx;
  int cta;           // rank in the cluster
  int warp;          // index over the cluster's warps
  unsigned pending;  // generation of the cluster barrier this fiber arrived at
  bool done;
  ucontext_t context;
  std::vector<char> stack;
  std::vector<Copy> open_group;                // cp.async since the last commit
  std::vector<std::vector<Copy>> committed;    // oldest first
};

// An mbarrier's phase: `pending` arrivals and `tx` bytes still to come (tx may go negative in between).
struct Mbarrier {
  int expected = 0;
  int pending = 0;
  long tx = 0;
  unsigned phase = 0;
};

struct AsyncStore {
  uint32_t addr;     // shared::cluster
  uint32_t barrier;  // shared::cluster address of the mbarrier it completes bytes on
  int bytes;
  unsigned char data[16];
};

// What a lane hands to a warp collective.
struct LaneSlot {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
  uint64_t value;
};

struct Machine {
  dim3 block_dim;
  std::vector<std::vector<unsigned char>> shared;  // per CTA of the running cluster
  std::vector<Fiber> fibers;
  std::vector<Rendezvous> cta_barrier, warp_barrier;
  Rendezvous cluster_barrier;
  std::vector<std::array<LaneSlot, 32>> warp_slots;
  std::map<uint32_t, Mbarrier> mbarriers;  // by shared::cluster address
  std::vector<AsyncStore> async_stores;     // in flight
  Fiber* current = nullptr;
  ucontext_t scheduler;
  long stalled = 0;       // waits in a row that saw no progress
  long long mma_count = 0;  // mma.sync calls of all warps, over the whole run
};

inline Machine& machine() {
  static Machine m;
  return m;
}

inline Fiber& self() { return *machine().current; }

inline void yield() { swapcontext(&self().context, &machine().scheduler); }

inline void progress() { machine().stalled = 0; }

// Yields from a wait that cannot proceed yet; aborts once every fiber has waited several rounds without any
// arrival, store or barrier completion in between.
inline void wait_a_round() {
  Machine& m = machine();
  if (++m.stalled > 8 * static_cast<long>(m.fibers.size()) + 64) {
    std::fprintf(stderr, "deadlock: every thread of the cluster is waiting\n");
    std::abort();
  }
  yield();
}

inline void meet(Rendezvous& r) {
  progress();
  const unsigned generation = r.generation;
  if (++r.arrived == r.expected) {
    r.arrived = 0;
    ++r.generation;
    return;
  }
  while (r.generation == generation) wait_a_round();
}

inline int lane() { return static_cast<int>(self().thread_idx.x % 32); }

inline void meet_warp() { meet(machine().warp_barrier[self().warp]); }

inline LaneSlot& slot(int lane_index) { return machine().warp_slots[self().warp][lane_index]; }

template <typename T>
T shuffle(T value, int source) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a wide type");
  std::memcpy(&slot(lane()).value, &value, sizeof(T));
  meet_warp();
  T out;
  std::memcpy(&out, &slot(source).value, sizeof(T));
  meet_warp();
  return out;
}

inline float bf16_bits(uint32_t bits) {
  const uint32_t f = bits << 16;
  float v;
  std::memcpy(&v, &f, 4);
  return v;
}

inline float fp16_bits(uint32_t bits) {
  __half_raw raw;
  raw.x = static_cast<unsigned short>(bits);
  return __half2float(__half(raw));
}

inline float tf32_bits(uint32_t bits) {
  const uint32_t f = bits & 0xffffe000u;  // the tensor core reads 10 mantissa bits
  float v;
  std::memcpy(&v, &f, 4);
  return v;
}

// mma.sync.m16n8k16 (16-bit inputs) and m16n8k8 (tf32) per the PTX ISA fragment tables, lane = 4*group + t:
// A(row, k) and B(k, col) are looked up in the lanes that hold them; each lane computes its own four C entries.
template <int kK, class Element>
void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1,
         Element element) {
  LaneSlot& mine = slot(lane());
  mine.a[0] = a0, mine.a[1] = a1, mine.a[2] = a2, mine.a[3] = a3;
  mine.b[0] = b0, mine.b[1] = b1;
  meet_warp();
  auto a = [&](int row, int k) {
    if (kK == 16) {
      const uint32_t word = slot(4 * (row % 8) + (k % 8) / 2).a[row / 8 + 2 * (k / 8)];
      return element(k % 2 ? word >> 16 : word & 0xffffu);
    }
    return element(slot(4 * (row % 8) + k % 4).a[row / 8 + 2 * (k / 4)]);
  };
  auto b = [&](int k, int col) {
    if (kK == 16) {
      const uint32_t word = slot(4 * col + (k % 8) / 2).b[k / 8];
      return element(k % 2 ? word >> 16 : word & 0xffffu);
    }
    return element(slot(4 * col + k % 4).b[k / 4]);
  };
  if (lane() == 0) ++machine().mma_count;
  float d[4];
  for (int i = 0; i < 4; ++i) {
    const int row = lane() / 4 + 8 * (i / 2), col = 2 * (lane() % 4) + i % 2;
    float sum = c[i];
    for (int k = 0; k < kK; ++k) sum += a(row, k) * b(k, col);
    d[i] = sum;
  }
  meet_warp();
  for (int i = 0; i < 4; ++i) c[i] = d[i];
}

inline void start_fiber(Fiber& f, void (*body)()) {
  constexpr size_t kStackBytes = 256 * 1024;
  f.stack.resize(kStackBytes);
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack.data();
  f.context.uc_stack.ss_size = f.stack.size();
  f.context.uc_link = &machine().scheduler;
  makecontext(&f.context, body, 0);
}

// Runs `kernel(problem)` for every CTA of the grid, one cluster at a time.
template <class Kernel, class Problem>
void launch(Kernel kernel, dim3 grid, dim3 block, int cluster, size_t shared_bytes, const Problem& problem) {
  Machine& m = machine();
  const int threads = static_cast<int>(block.x), warps = (threads + 31) / 32;
  m.block_dim = block;
  static const Problem* launched;
  static Kernel entry;
  launched = &problem;
  entry = kernel;
  for (unsigned y = 0; y < grid.y; ++y) {
    for (unsigned x0 = 0; x0 < grid.x; x0 += cluster) {
      m.shared.assign(cluster, std::vector<unsigned char>(shared_bytes + 16, 0xff));
      m.mbarriers.clear();
      m.async_stores.clear();
      m.stalled = 0;
      m.cta_barrier.assign(cluster, Rendezvous{threads, 0, 0});
      m.warp_barrier.assign(cluster * warps, Rendezvous{32, 0, 0});
      m.warp_slots.assign(cluster * warps, {});
      m.cluster_barrier = Rendezvous{cluster * threads, 0, 0};
      m.fibers.assign(cluster * threads, Fiber{});
      for (int cta = 0; cta < cluster; ++cta) {
        for (int t = 0; t < threads; ++t) {
          Fiber& f = m.fibers[cta * threads + t];
          f.thread_idx = make_uint3(t, 0, 0);
          f.block_idx = make_uint3(x0 + cta, y, 0);
          f.cta = cta;
          f.warp = cta * warps + t / 32;
          f.done = false;
          start_fiber(f, +[] {
            entry(*launched);
            self().done = true;
          });
        }
      }
      for (bool running = true; running;) {
        running = false;
        for (Fiber& f : m.fibers) {
          if (f.done) continue;
          running = true;
          m.current = &f;
          swapcontext(&m.scheduler, &f.context);
        }
      }
      if (!m.async_stores.empty()) {
        std::fprintf(stderr, "%zu st.async still in flight when the cluster exited\n", m.async_stores.size());
        std::abort();
      }
    }
  }
}

}  // namespace emu

// ---------------------------------------------------------------------------------------------------------
// CUDA built-ins.

namespace emu {
// One coordinate of a built-in, read from the running fiber when used.
struct Coordinate {
  unsigned (*read)();
  operator unsigned() const { return read(); }
};
struct Coordinates {
  Coordinate x, y, z;
};
}  // namespace emu

inline const emu::Coordinates threadIdx{{[] { return emu::self().thread_idx.x; }},
                                        {[] { return emu::self().thread_idx.y; }},
                                        {[] { return emu::self().thread_idx.z; }}};
inline const emu::Coordinates blockIdx{{[] { return emu::self().block_idx.x; }},
                                       {[] { return emu::self().block_idx.y; }},
                                       {[] { return emu::self().block_idx.z; }}};
inline const emu::Coordinates blockDim{{[] { return emu::machine().block_dim.x; }},
                                       {[] { return emu::machine().block_dim.y; }},
                                       {[] { return emu::machine().block_dim.z; }}};

inline void __syncthreads() { emu::meet(emu::machine().cta_barrier[emu::self().cta]); }

inline void __syncwarp() { emu::meet_warp(); }

template <typename T>
T __shfl_sync(unsigned, T value, int source) {
  return emu::shuffle(value, source);
}

template <typename T>
T __shfl_xor_sync(unsigned, T value, int mask) {
  return emu::shuffle(value, emu::lane() ^ mask);
}

template <typename T>
T __ldg(const T* p) {
  return *p;
}

inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }

inline float __uint_as_float(uint32_t bits) {
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

inline uint32_t __float_as_uint(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return bits;
}

inline long long __double_as_longlong(double v) {
  long long bits;
  std::memcpy(&bits, &v, 8);
  return bits;
}

[[noreturn]] inline void __trap() {
  std::fprintf(stderr, "__trap()\n");
  std::abort();
}

// ---------------------------------------------------------------------------------------------------------
// lstm_primitives.cuh. A shared::cta address is (rank in cluster) << 24 | byte offset.

namespace rnn_fast {
namespace cuda {
namespace detail {

inline unsigned char* dynamic_shared_memory() { return emu::machine().shared[emu::self().cta].data(); }

inline void mma_m16n8k16_bf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                              uint32_t b1) {
  emu::mma<16>(c, a0, a1, a2, a3, b0, b1, emu::bf16_bits);
}

inline void mma_m16n8k16_f16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                             uint32_t b1) {
  emu::mma<16>(c, a0, a1, a2, a3, b0, b1, emu::fp16_bits);
}

inline void mma_m16n8k8_tf32(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                             uint32_t b1) {
  emu::mma<8>(c, a0, a1, a2, a3, b0, b1, emu::tf32_bits);
}

// cvt.rna: round the 13 dropped bits to nearest, ties away from zero (finite inputs).
inline uint32_t round_to_tf32(float v) { return (__float_as_uint(v) + 0x1000u) & 0xffffe000u; }

// tanh.approx.f32's maximum relative error (PTX ISA: 2^-10.987), applied in full and always in the same
// direction: a pessimistic stand-in for MUFU.TANH, whose error varies in sign and size with x.
constexpr double kTanhApproxRelativeError = 4.94e-4;
inline float tanh_approx(float x) { return static_cast<float>(std::tanh(static_cast<double>(x)) * (1.0 + kTanhApproxRelativeError)); }

inline void cp_async(void* shared, const void* global, int bytes) {
  emu::self().open_group.push_back(emu::Copy{shared, global, bytes});
}

inline void cp_async_commit() {
  emu::Fiber& f = emu::self();
  f.committed.push_back(std::move(f.open_group));
  f.open_group.clear();
}

inline void cp_async_wait(int pending) {
  emu::Fiber& f = emu::self();
  while (static_cast<int>(f.committed.size()) > pending) {
    for (const emu::Copy& copy : f.committed.front()) std::memcpy(copy.dst, copy.src, copy.bytes);
    f.committed.erase(f.committed.begin());
  }
}

inline uint32_t shared_address(const void* p) {
  const auto offset = static_cast<const unsigned char*>(p) - dynamic_shared_memory();
  return static_cast<uint32_t>(emu::self().cta) << 24 | static_cast<uint32_t>(offset);
}

inline uint32_t cluster_address(uint32_t local, int rank) { return static_cast<uint32_t>(rank) << 24 | (local & 0xffffffu); }

template <typename Raw>
void store_cluster(uint32_t addr, Raw v) {
  std::memcpy(emu::machine().shared[addr >> 24].data() + (addr & 0xffffffu), &v, sizeof v);
}

inline void cluster_arrive() {
  emu::Rendezvous& r = emu::machine().cluster_barrier;
  emu::self().pending = r.generation;
  if (++r.arrived == r.expected) {
    r.arrived = 0;
    ++r.generation;
  }
}

inline void cluster_wait() {
  while (emu::machine().cluster_barrier.generation == emu::self().pending) emu::wait_a_round();
}

inline emu::Mbarrier& mbarrier_at(uint32_t barrier) {
  const auto found = emu::machine().mbarriers.find(barrier);
  if (found == emu::machine().mbarriers.end()) {
    std::fprintf(stderr, "mbarrier at %#x used before mbarrier.init\n", barrier);
    std::abort();
  }
  return found->second;
}

inline void complete_phase_if_done(emu::Mbarrier& b) {
  if (b.pending == 0 && b.tx == 0) {
    ++b.phase;
    b.pending = b.expected;
  }
}

inline void mbarrier_init(uint32_t barrier, int count) {
  emu::machine().mbarriers[barrier] = emu::Mbarrier{count, count, 0, 0};
}

inline void fence_mbarrier_init() {}

inline void mbarrier_arrive_expect_tx(uint32_t barrier, uint32_t bytes) {
  emu::progress();
  emu::Mbarrier& b = mbarrier_at(barrier);
  if (b.pending == 0) {
    std::fprintf(stderr, "mbarrier at %#x: more arrivals than its count\n", barrier);
    std::abort();
  }
  b.tx += bytes;
  --b.pending;
  complete_phase_if_done(b);
}

inline void mbarrier_arrive(uint32_t barrier) { mbarrier_arrive_expect_tx(barrier, 0); }

// The st.async stores that complete bytes on `barrier` land now, in the order they were issued.
inline void deliver_async_stores(uint32_t barrier) {
  std::vector<emu::AsyncStore>& stores = emu::machine().async_stores;
  for (size_t i = 0; i < stores.size();) {
    if (stores[i].barrier != barrier) {
      ++i;
      continue;
    }
    const emu::AsyncStore store = stores[i];
    stores.erase(stores.begin() + static_cast<long>(i));
    std::memcpy(emu::machine().shared[store.addr >> 24].data() + (store.addr & 0xffffffu), store.data, store.bytes);
    emu::Mbarrier& b = mbarrier_at(barrier);
    b.tx -= store.bytes;
    complete_phase_if_done(b);
    emu::progress();
  }
}

inline void mbarrier_wait_parity(uint32_t barrier, uint32_t parity) {
  for (;;) {
    deliver_async_stores(barrier);
    if ((mbarrier_at(barrier).phase & 1u) != parity) return;
    emu::wait_a_round();
  }
}

template <typename Raw>
void store_async(uint32_t addr, Raw v, uint32_t barrier) {
  static_assert(sizeof(Raw) <= 16, "st.async moves at most 16 bytes");
  emu::progress();
  emu::AsyncStore store{addr, barrier, static_cast<int>(sizeof(Raw)), {}};
  std::memcpy(store.data, &v, sizeof(Raw));
  emu::machine().async_stores.push_back(store);
}

}  // namespace detail
}  // namespace cuda
}  // namespace rnn_fast
