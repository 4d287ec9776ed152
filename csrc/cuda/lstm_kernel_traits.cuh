// What a kernel is, per precision and variant set: its multiply policy, saved-state type and batch tiles
// (Config), its arguments (ConfigArgs), and the declarations of the two kernels. The launch template plans and
// launches through these declarations, so that an instantiation file includes the one kernel header it compiles.
#pragma once

#include <type_traits>

#include "lstm_mma_policies.cuh"
#include "lstm_recurrence.h"

namespace rnn_fast::cuda::detail {

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

// The kernels, defined in lstm_forward_kernel.cuh (kSaveState: the forward that also writes the saved gates
// and cells; without it, the inference kernel) and lstm_backward_kernel.cuh.
template <Precision P, unsigned V, int MT, bool kSaveState>
__global__ void lstm_forward_kernel(const Problem<ConfigArgs<P, V, Pass::kForward>> problem);

template <Precision P, unsigned V, int MT>
__global__ void lstm_backward_kernel(const Problem<ConfigArgs<P, V, Pass::kBackward>> problem);

}  // namespace rnn_fast::cuda::detail
