// CUDA kernels of the rnn_fast::lstm_recurrence_forward/backward ops (schemas in csrc/rnn_fast.cpp): input
// checks, dtype dispatch, output allocation and the launch on the current stream. The kernels themselves are
// framework-free (lstm_recurrence.cuh) and reached through the plain entry points of lstm_recurrence.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "../recurrence_checks.h"
#include "lstm_recurrence.h"

// Newer torch declares this enum (with RNN among its values) and a per-operator TF32 switch taking it; older torch
// has neither, and this opaque declaration then names an empty enum that the detection below rejects.
namespace at {
enum class Float32Op;
}

namespace {

namespace rc = rnn_fast::cuda;
using rc::Precision;

// The element types of each precision and its two entry points.
template <Precision P>
struct Entry;
template <>
struct Entry<Precision::kBfloat16> {
  using Elem = __nv_bfloat16;
  using State = float;
  static constexpr auto forward = &rc::lstm_forward_bf16;
  static constexpr auto backward = &rc::lstm_backward_bf16;
};
template <>
struct Entry<Precision::kFloat16> {
  using Elem = __half;
  using State = float;
  static constexpr auto forward = &rc::lstm_forward_fp16;
  static constexpr auto backward = &rc::lstm_backward_fp16;
};
template <>
struct Entry<Precision::kTf32> {
  using Elem = float;
  using State = float;
  static constexpr auto forward = &rc::lstm_forward_tf32;
  static constexpr auto backward = &rc::lstm_backward_tf32;
};
template <>
struct Entry<Precision::kFloat32> {
  using Elem = float;
  using State = float;
  static constexpr auto forward = &rc::lstm_forward_fp32;
  static constexpr auto backward = &rc::lstm_backward_fp32;
};
template <>
struct Entry<Precision::kFloat64> {
  using Elem = double;
  using State = double;
  static constexpr auto forward = &rc::lstm_forward_fp64;
  static constexpr auto backward = &rc::lstm_backward_fp64;
};

template <typename Op, typename = void>
struct HasOperatorTf32Switch : std::false_type {};
template <typename Op>
struct HasOperatorTf32Switch<Op, std::void_t<decltype(at::globalContext().allowTF32CuDNN(Op::RNN))>>
    : std::true_type {};

// The switch nn.LSTM's cuDNN kernels follow: `torch.backends.cudnn.rnn.fp32_precision` (which the legacy
// `torch.backends.cudnn.allow_tf32` also sets) where torch has it; the operator-less query would throw once the RNN
// and convolution settings differ.
template <typename Op = at::Float32Op>
bool cudnn_rnn_allows_tf32() {
  if constexpr (HasOperatorTf32Switch<Op>::value) {
    return at::globalContext().allowTF32CuDNN(Op::RNN);
  } else {
    return at::globalContext().allowTF32CuDNN();
  }
}

// float32 follows cuDNN's RNN TF32 switch, as nn.LSTM does.
Precision precision_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::ScalarType::BFloat16:
      return Precision::kBfloat16;
    case at::ScalarType::Half:
      return Precision::kFloat16;
    case at::ScalarType::Float:
      return cudnn_rnn_allows_tf32() ? Precision::kTf32 : Precision::kFloat32;
    case at::ScalarType::Double:
      return Precision::kFloat64;
    default:
      TORCH_CHECK(false, "rnn_fast's CUDA LSTM recurrence supports float16, bfloat16, float32 and float64, got ",
                  dtype);
  }
}

void check_supported(Precision precision, int64_t hidden, at::ScalarType dtype) {
  const char* reason = rc::recurrence_unsupported_reason(precision, static_cast<int>(hidden));
  TORCH_CHECK(reason == nullptr, "rnn_fast's CUDA LSTM recurrence cannot run ", dtype, " with hidden_size=", hidden,
              ": ", reason);
}

template <typename T>
const T* in(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}

template <typename T>
T* out(at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

const int64_t* lengths_ptr(const std::optional<at::Tensor>& lengths) {
  return lengths.has_value() ? lengths->data_ptr<int64_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_recurrence_forward_cuda(
    const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
    const std::optional<at::Tensor>& lengths) {
  const rnn_fast::RecurrenceSizes sizes = rnn_fast::check_forward_inputs(xw, w_hh, h0, c0, lengths);
  const int64_t D = sizes.D, T = sizes.T, B = sizes.B, H = sizes.H, G = 4 * H;
  const at::Device device = xw.device();
  const at::ScalarType dtype = xw.scalar_type();

  const c10::cuda::CUDAGuard guard(device);
  const Precision precision = precision_of(dtype);
  check_supported(precision, H, dtype);
  at::Tensor y = at::empty({D, T, B, H}, xw.options());
  at::Tensor h_n = at::empty({D, B, H}, xw.options());
  at::Tensor c_n = at::empty({D, B, H}, xw.options());
  at::Tensor gates = at::empty({D, T, B, G}, xw.options().dtype(rnn_fast::state_type(dtype)));
  at::Tensor cell = at::empty({D, T, B, H}, xw.options().dtype(rnn_fast::state_type(dtype)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  rc::dispatch_precision(precision, [&](auto tag) {
    using E = Entry<decltype(tag)::value>;
    using Elem = typename E::Elem;
    using State = typename E::State;
    const rc::RecurrenceForwardArgs<Elem, State> args{
        in<Elem>(xw), in<Elem>(w_hh), in<Elem>(h0), in<Elem>(c0), lengths_ptr(lengths),
        out<Elem>(y), out<Elem>(h_n), out<Elem>(c_n), out<State>(gates), out<State>(cell),
        static_cast<int>(D), static_cast<int>(T), static_cast<int>(B), static_cast<int>(H)};
    C10_CUDA_CHECK(E::forward(args, stream));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, h_n, c_n, gates, cell};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_recurrence_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& w_hh, const at::Tensor& c0, const at::Tensor& gates, const at::Tensor& cell,
    const std::optional<at::Tensor>& lengths) {
  const rnn_fast::RecurrenceSizes sizes =
      rnn_fast::check_backward_inputs(grad_y, grad_h_n, grad_c_n, w_hh, c0, gates, cell, lengths);
  const int64_t D = sizes.D, T = sizes.T, B = sizes.B, H = sizes.H, G = 4 * H;
  const at::Device device = w_hh.device();
  const at::ScalarType dtype = w_hh.scalar_type();

  const c10::cuda::CUDAGuard guard(device);
  const Precision precision = precision_of(dtype);
  check_supported(precision, H, dtype);
  at::Tensor grad_xw = at::empty({D, T, B, G}, w_hh.options());
  at::Tensor grad_h0 = at::empty({D, B, H}, w_hh.options());
  at::Tensor grad_c0 = at::empty({D, B, H}, w_hh.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  rc::dispatch_precision(precision, [&](auto tag) {
    using E = Entry<decltype(tag)::value>;
    using Elem = typename E::Elem;
    using State = typename E::State;
    const rc::RecurrenceBackwardArgs<Elem, State> args{
        in<Elem>(grad_y), in<Elem>(grad_h_n), in<Elem>(grad_c_n), in<Elem>(w_hh), in<Elem>(c0),
        in<State>(gates), in<State>(cell), lengths_ptr(lengths),
        out<Elem>(grad_xw), out<Elem>(grad_h0), out<Elem>(grad_c0),
        static_cast<int>(D), static_cast<int>(T), static_cast<int>(B), static_cast<int>(H)};
    C10_CUDA_CHECK(E::backward(args, stream));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_xw, grad_h0, grad_c0};
}

// "" when the kernels run `dtype` at `hidden_size` on `device`, else why not; for the backend's
// unsupported_reason. float32 must work in both TF32 and IEEE mode, since the mode is read at each call.
std::string lstm_recurrence_cuda_unsupported_reason(const at::Device& device, at::ScalarType dtype,
                                                    int64_t hidden_size) {
  TORCH_CHECK(device.is_cuda(), "expected a CUDA device, got ", device);
  if (dtype != at::ScalarType::BFloat16 && dtype != at::ScalarType::Half && dtype != at::ScalarType::Float &&
      dtype != at::ScalarType::Double) {
    return "the CUDA kernels support float16, bfloat16, float32 and float64";
  }
  if (hidden_size > std::numeric_limits<int>::max()) return "hidden_size must fit in int32";
  const c10::cuda::CUDAGuard guard(device);
  const int hidden = static_cast<int>(hidden_size);
  const char* reason = nullptr;
  if (dtype == at::ScalarType::Float) {
    reason = rc::recurrence_unsupported_reason(Precision::kTf32, hidden);
    if (reason == nullptr) reason = rc::recurrence_unsupported_reason(Precision::kFloat32, hidden);
  } else {
    reason = rc::recurrence_unsupported_reason(precision_of(dtype), hidden);
  }
  return reason == nullptr ? std::string() : std::string(reason);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rnn_fast, m) {
  m.def("lstm_recurrence_cuda_unsupported_reason(Device device, ScalarType dtype, int hidden_size) -> str",
        &lstm_recurrence_cuda_unsupported_reason);
}

TORCH_LIBRARY_IMPL(rnn_fast, CUDA, m) {
  m.impl("lstm_recurrence_forward", &lstm_recurrence_forward_cuda);
  m.impl("lstm_recurrence_backward", &lstm_recurrence_backward_cuda);
}
