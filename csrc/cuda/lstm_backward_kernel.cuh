// The backward recurrence kernel (design: lstm_kernel_common.cuh): processing steps in reverse; per step the
// elementwise gate gradients of the thread's (row, unit) pairs, published to the cluster, then
// dh = dgates @ W_hh for the thread's pairs. Included by the lstm_backward_<precision>.cu files, which
// instantiate it through lstm_launch_template.cuh.
#pragma once

#include <utility>

#include "lstm_backward_inputs.cuh"
#include "lstm_cluster_exchange.cuh"

namespace rnn_fast::cuda::detail {

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

}  // namespace rnn_fast::cuda::detail
