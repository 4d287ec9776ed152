// CUDA kernels of the rnn_fast::lstm_recurrence_forward/backward/inference ops (schemas in csrc/rnn_fast.cpp):
// input checks, dtype dispatch, the kernel variants of RNN_FAST_CUDA_VARIANTS, output allocation and the launch on
// the current stream. The kernels themselves are framework-free (the .cuh headers of csrc/cuda) and reached through the
// plain entry points of lstm_recurrence.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
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

// The element types of each precision and its entry points (overloaded on the saved-state type).
#define RNN_FAST_ENTRIES(PRECISION, ELEM, STATE, SUFFIX)                                       \
  template <>                                                                                 \
  struct Entry<Precision::PRECISION> {                                                        \
    using Elem = ELEM;                                                                        \
    using State = STATE;                                                                      \
    template <class Args>                                                                     \
    static cudaError_t forward(const Args& args, unsigned variants, cudaStream_t stream) {   \
      return rc::lstm_forward_##SUFFIX(args, variants, stream);                               \
    }                                                                                         \
    template <class Args>                                                                     \
    static cudaError_t inference(const Args& args, unsigned variants, cudaStream_t stream) { \
      return rc::lstm_inference_##SUFFIX(args, variants, stream);                             \
    }                                                                                         \
    template <class Args>                                                                     \
    static cudaError_t backward(const Args& args, unsigned variants, cudaStream_t stream) {  \
      return rc::lstm_backward_##SUFFIX(args, variants, stream);                              \
    }                                                                                         \
  };

template <Precision P>
struct Entry;
RNN_FAST_ENTRIES(kBfloat16, __nv_bfloat16, float, bf16)
RNN_FAST_ENTRIES(kFloat16, __half, float, fp16)
RNN_FAST_ENTRIES(kTf32, float, float, tf32)
RNN_FAST_ENTRIES(kFloat32, float, float, fp32)
RNN_FAST_ENTRIES(kFloat64, double, double, fp64)
#undef RNN_FAST_ENTRIES

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

// RNN_FAST_CUDA_VARIANTS as a set of rc::Variant flags, read at every call and parsed once per distinct value.
unsigned requested_variants() {
  static std::mutex mutex;
  static std::string parsed_text;
  static unsigned parsed = 0;
  const char* env = std::getenv("RNN_FAST_CUDA_VARIANTS");
  const char* text = env == nullptr ? "" : env;
  const std::lock_guard<std::mutex> lock(mutex);
  if (std::strcmp(text, parsed_text.c_str()) == 0) return parsed;
  unsigned variants = 0;
  const char* bad = nullptr;
  int bad_length = 0;
  if (!rc::parse_variants(text, variants, bad, bad_length)) {
    std::string valid;
    for (const char* name : rc::kVariantNames) valid += (valid.empty() ? "" : ", ") + std::string(name);
    TORCH_CHECK(false, "RNN_FAST_CUDA_VARIANTS names an unknown variant '", std::string(bad, bad_length),
                "'; valid names are ", valid);
  }
  parsed_text = text;
  parsed = variants;
  return parsed;
}

// The device's compute capability major, asked once per device.
int compute_major(const at::Device& device) {
  static std::mutex mutex;
  static std::map<int, int> majors;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = majors.find(device.index());
  if (found != majors.end()) return found->second;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index()));
  majors.emplace(device.index(), major);
  return major;
}

// The 16-bit saved-state dtype of `precision` (saved_16bit), or nullopt where there is none.
std::optional<at::ScalarType> half_saved_type(Precision precision) {
  switch (precision) {
    case Precision::kBfloat16:
      return at::ScalarType::BFloat16;
    case Precision::kFloat16:
    case Precision::kTf32:
      return at::ScalarType::Half;
    default:
      return std::nullopt;
  }
}

// The dtype of the gates and cells a forward saves: 16 bits under saved_16bit on sm_90 where the precision has
// a 16-bit type, else the contract's fp32 / fp64 state.
at::ScalarType saved_type(Precision precision, at::ScalarType dtype, const at::Device& device) {
  const std::optional<at::ScalarType> half = half_saved_type(precision);
  if (half.has_value() && (requested_variants() & rc::kSaved16bit) != 0 && compute_major(device) >= 9) return *half;
  return rnn_fast::state_type(dtype);
}

// The variant set the kernels will run for `pass`; fails with the reason where this build has no kernel for it.
unsigned variants_for(Precision precision, rc::Pass pass, bool saves_half, const at::Device& device) {
  if (compute_major(device) < 9) {
    TORCH_CHECK(!saves_half, "16-bit saved gates and cells (RNN_FAST_CUDA_VARIANTS=saved_16bit) need sm_90");
    return 0;
  }
  const unsigned variants = (requested_variants() & rc::applicable_variants(precision, pass) & ~rc::kSaved16bit) |
                            (saves_half ? rc::kSaved16bit : 0u);
  TORCH_CHECK(rc::variant_set_compiled(precision, pass, variants), "RNN_FAST_CUDA_VARIANTS=",
              std::getenv("RNN_FAST_CUDA_VARIANTS") == nullptr ? "" : std::getenv("RNN_FAST_CUDA_VARIANTS"),
              ": this build compiles the CUDA kernel variants one at a time or all together, not this combination",
              saves_half && (requested_variants() & rc::kSaved16bit) == 0
                  ? " (the backward's 16-bit saved gates and cells count as saved_16bit)"
                  : "");
  return variants;
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

template <typename T>
struct TypeTag {
  using type = T;
};

// `body(Entry<P>{}, TypeTag<Saved>{})` for the runtime precision and the saved-state type: the precision's State,
// or its SavedHalf when `saves_half`.
template <class Body>
void dispatch_entry(Precision precision, bool saves_half, Body&& body) {
  rc::dispatch_precision(precision, [&](auto tag) {
    constexpr Precision P = decltype(tag)::value;
    using Half = typename rc::SavedHalf<P>::type;
    if constexpr (!std::is_void<Half>::value) {
      if (saves_half) return body(Entry<P>{}, TypeTag<Half>{});
    }
    body(Entry<P>{}, TypeTag<typename Entry<P>::State>{});
  });
}

// The forward ops: checks, outputs and the launch, with saved gates and cells (the training forward, whose
// result's last two tensors hold them) or without (the inference op, whose last two stay undefined).
template <bool kSaves>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_forward(
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
  at::Tensor gates, cell;
  bool saves_half = false;
  if constexpr (kSaves) {
    const at::ScalarType saved = saved_type(precision, dtype, device);
    saves_half = saved != rnn_fast::state_type(dtype);
    gates = at::empty({D, T, B, G}, xw.options().dtype(saved));
    cell = at::empty({D, T, B, H}, xw.options().dtype(saved));
  }
  const rc::Pass pass = kSaves ? rc::Pass::kForward : rc::Pass::kInference;
  const unsigned variants = variants_for(precision, pass, saves_half, device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  dispatch_entry(precision, saves_half, [&](auto entry, auto saved) {
    using E = decltype(entry);
    using Elem = typename E::Elem;
    using Saved = typename decltype(saved)::type;
    const rc::RecurrenceForwardArgs<Elem, Saved> args{
        in<Elem>(xw), in<Elem>(w_hh), in<Elem>(h0), in<Elem>(c0), lengths_ptr(lengths),
        out<Elem>(y), out<Elem>(h_n), out<Elem>(c_n),
        kSaves ? out<Saved>(gates) : nullptr, kSaves ? out<Saved>(cell) : nullptr,
        static_cast<int>(D), static_cast<int>(T), static_cast<int>(B), static_cast<int>(H)};
    if constexpr (kSaves) {
      C10_CUDA_CHECK(E::forward(args, variants, stream));
    } else if constexpr (std::is_same<Saved, typename E::State>::value) {
      C10_CUDA_CHECK(E::inference(args, variants, stream));
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, h_n, c_n, gates, cell};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_recurrence_forward_cuda(
    const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
    const std::optional<at::Tensor>& lengths) {
  return run_forward<true>(xw, w_hh, h0, c0, lengths);
}

// The forward that saves nothing: the same kernels without their gate and cell stores.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_recurrence_inference_cuda(
    const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
    const std::optional<at::Tensor>& lengths) {
  const auto outputs = run_forward<false>(xw, w_hh, h0, c0, lengths);
  return {std::get<0>(outputs), std::get<1>(outputs), std::get<2>(outputs)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_recurrence_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& w_hh, const at::Tensor& c0, const at::Tensor& gates, const at::Tensor& cell,
    const std::optional<at::Tensor>& lengths) {
  const at::ScalarType dtype = w_hh.scalar_type();
  const Precision precision = precision_of(dtype);
  // Saved state in the precision's 16-bit type is what a saved_16bit forward wrote: the kernel follows the data.
  const std::optional<at::ScalarType> half = half_saved_type(precision);
  const bool saves_half = half.has_value() && gates.scalar_type() == *half;
  const rnn_fast::RecurrenceSizes sizes = rnn_fast::check_backward_inputs(
      grad_y, grad_h_n, grad_c_n, w_hh, c0, gates, cell, lengths, saves_half ? *half : rnn_fast::state_type(dtype));
  const int64_t D = sizes.D, T = sizes.T, B = sizes.B, H = sizes.H, G = 4 * H;
  const at::Device device = w_hh.device();

  const c10::cuda::CUDAGuard guard(device);
  check_supported(precision, H, dtype);
  const unsigned variants = variants_for(precision, rc::Pass::kBackward, saves_half, device);
  at::Tensor grad_xw = at::empty({D, T, B, G}, w_hh.options());
  at::Tensor grad_h0 = at::empty({D, B, H}, w_hh.options());
  at::Tensor grad_c0 = at::empty({D, B, H}, w_hh.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  dispatch_entry(precision, saves_half, [&](auto entry, auto saved) {
    using E = decltype(entry);
    using Elem = typename E::Elem;
    using Saved = typename decltype(saved)::type;
    const rc::RecurrenceBackwardArgs<Elem, Saved> args{
        in<Elem>(grad_y), in<Elem>(grad_h_n), in<Elem>(grad_c_n), in<Elem>(w_hh), in<Elem>(c0),
        in<Saved>(gates), in<Saved>(cell), lengths_ptr(lengths),
        out<Elem>(grad_xw), out<Elem>(grad_h0), out<Elem>(grad_c0),
        static_cast<int>(D), static_cast<int>(T), static_cast<int>(B), static_cast<int>(H)};
    C10_CUDA_CHECK(E::backward(args, variants, stream));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_xw, grad_h0, grad_c0};
}

// The dtype a forward on `device` in `dtype` saves its gates and cells in, now: for the ops' fake registration
// (rnn_fast/ops/lstm/extension.py), so that it says what the launcher does.
at::ScalarType lstm_recurrence_cuda_saved_dtype(const at::Device& device, at::ScalarType dtype) {
  TORCH_CHECK(device.is_cuda(), "expected a CUDA device, got ", device);
  const at::Device indexed = device.has_index() ? device : at::Device(at::kCUDA, c10::cuda::current_device());
  return saved_type(precision_of(dtype), dtype, indexed);
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
  m.def("lstm_recurrence_cuda_saved_dtype(Device device, ScalarType dtype) -> ScalarType",
        &lstm_recurrence_cuda_saved_dtype);
}

TORCH_LIBRARY_IMPL(rnn_fast, CUDA, m) {
  m.impl("lstm_recurrence_forward", &lstm_recurrence_forward_cuda);
  m.impl("lstm_recurrence_backward", &lstm_recurrence_backward_cuda);
  m.impl("lstm_recurrence_inference", &lstm_recurrence_inference_cuda);
}
