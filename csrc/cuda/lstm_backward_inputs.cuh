// Where the backward kernel's per-step inputs (saved gates, grad_y, the previous cell) wait between their load
// and their use: in registers one step ahead (the baseline), or in cp.async shared-memory slots several steps
// ahead (kBackwardPrefetch). Apart from the kernel because the planner sizes the slots' shared memory too.
#pragma once

#include <type_traits>

#include "lstm_kernel_traits.cuh"

namespace rnn_fast::cuda::detail {

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

}  // namespace rnn_fast::cuda::detail
