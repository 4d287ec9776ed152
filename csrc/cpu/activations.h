// Activations, within about 2x torch's own float32 error against float64 (tests/library/ops/test_extension_cpu.py).
// float32 builds both from one vectorisable e^y = 2^n e^r (|r| <= ln2/2, e^r - 1 from its Taylor series to r^7,
// truncation below 1e-8): e^y + 1 = 2^n (e^r - 1) + (2^n + 1) is then exact but for one rounding, so
// sigmoid = 1 / (1 + e^-x) keeps its relative accuracy down to e^-87, and tanh = 1 - 2 / (e^2|x| + 1) is accurate
// where that difference does not cancel, |x| >= 0.9; below, an odd minimax polynomial (fitted for rnn_fast) takes
// over. float64 uses libm, since its tests are held to 1e-9.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "vectorise.h"

namespace rnn_fast::cpu {

struct ScaledExpMinusOne {
  float scale;          // 2^n
  float mantissa_less;  // e^r - 1, so that e^y = scale * (mantissa_less + 1)
};

RNN_FAST_INLINE ScaledExpMinusOne split_exp(float y) {
  y = y < -87.0f ? -87.0f : y;  // not std::min/max: those are compiled before vectorise.h's pragma
  y = y > 88.0f ? 88.0f : y;    // 2^n stays a normal float
  constexpr float kRoundingShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (y * 1.44269504088896341f + kRoundingShift) - kRoundingShift;
  // ln 2 in two parts, the first exact in float, so that r = y - n ln2 is exact to float precision.
  const float r = (y - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = r * (1.0f / 5040) + (1.0f / 720);
  p = p * r + (1.0f / 120);
  p = p * r + (1.0f / 24);
  p = p * r + (1.0f / 6);
  p = p * r + 0.5f;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &exponent_bits, sizeof(scale));
  return {scale, r + r * r * p};
}

RNN_FAST_INLINE float exp_plus_one(float y) {
  const ScaledExpMinusOne e = split_exp(y);
  return e.scale * e.mantissa_less + (e.scale + 1.0f);
}

RNN_FAST_INLINE float tanh_activation(float x) {
  const float a = x < 0.0f ? -x : x;
  const float large = 1.0f - 2.0f / exp_plus_one(2.0f * a);
  const float z = x * x;
  float q = z * -4.5565e-4f + 2.5833e-3f;
  q = q * z + -8.26538e-3f;
  q = q * z + 2.166408e-2f;
  q = q * z + -5.392947e-2f;
  q = q * z + 1.3332981e-1f;
  q = q * z + -3.3333322e-1f;
  const float small = x + x * z * q;
  return a < 0.9f ? small : (x < 0.0f ? -large : large);
}

RNN_FAST_INLINE float sigmoid_activation(float x) { return 1.0f / exp_plus_one(-x); }
RNN_FAST_INLINE double tanh_activation(double x) { return std::tanh(x); }
RNN_FAST_INLINE double sigmoid_activation(double x) { return 1.0 / (1.0 + std::exp(-x)); }

}  // namespace rnn_fast::cpu
