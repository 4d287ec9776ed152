// The forward recurrence kernel (design: lstm_kernel_common.cuh). kSaveState: it also writes the saved gates and
// cells (the forward); without, it is the inference kernel. Included by the lstm_{forward,inference}_<precision>.cu
// files, which instantiate it through lstm_launch_template.cuh.
#pragma once

#include "lstm_cluster_exchange.cuh"
#include "lstm_kernel_traits.cuh"

namespace rnn_fast::cuda::detail {

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

}  // namespace rnn_fast::cuda::detail
