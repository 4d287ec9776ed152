// Plain C++ entry points of the CUDA LSTM recurrence (docs/contract.md): raw device pointers, sizes and a
// stream, no framework types. Implemented by the lstm_{forward,backward}_<precision>.cu files; the torch-facing
// launcher (lstm_cuda.cpp) is one caller, anything that can hand over device pointers can be another.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace rnn_fast {
namespace cuda {

// The forward op's tensors; every pointer is a contiguous device array on the current device.
template <typename Elem, typename State>
struct RecurrenceForwardArgs {
  const Elem* xw;          // [D, T, B, 4H]
  const Elem* w_hh;        // [D, 4H, H]
  const Elem* h0;          // [D, B, H]
  const Elem* c0;          // [D, B, H]
  const int64_t* lengths;  // [B], or nullptr: every row has length T
  Elem* y;                 // [D, T, B, H]
  Elem* h_n;               // [D, B, H]
  Elem* c_n;               // [D, B, H]
  State* gates;            // [D, T, B, 4H]
  State* cell;             // [D, T, B, H]
  int directions, seq_len, batch, hidden;
};

// The backward op's tensors.
template <typename Elem, typename State>
struct RecurrenceBackwardArgs {
  const Elem* grad_y;      // [D, T, B, H]
  const Elem* grad_h_n;    // [D, B, H]
  const Elem* grad_c_n;    // [D, B, H]
  const Elem* w_hh;        // [D, 4H, H]
  const Elem* c0;          // [D, B, H]
  const State* gates;      // [D, T, B, 4H]
  const State* cell;       // [D, T, B, H]
  const int64_t* lengths;  // [B] or nullptr
  Elem* grad_xw;           // [D, T, B, 4H]
  Elem* grad_h0;           // [D, B, H]
  Elem* grad_c0;           // [D, B, H]
  int directions, seq_len, batch, hidden;
};

// How h @ W_hh^T and dgates @ W_hh are multiplied. kTf32 takes float32 tensors (cuDNN's allow_tf32 mode).
enum class Precision { kBfloat16, kFloat16, kTf32, kFloat32, kFloat64 };

template <Precision P>
struct PrecisionTag {
  static constexpr Precision value = P;
};

// `body(PrecisionTag<P>{})` for the runtime `precision`: the one switch from a runtime precision to the kernels'
// compile-time one.
template <class Body>
auto dispatch_precision(Precision precision, Body&& body) {
  switch (precision) {
    case Precision::kBfloat16:
      return body(PrecisionTag<Precision::kBfloat16>{});
    case Precision::kFloat16:
      return body(PrecisionTag<Precision::kFloat16>{});
    case Precision::kTf32:
      return body(PrecisionTag<Precision::kTf32>{});
    case Precision::kFloat32:
      return body(PrecisionTag<Precision::kFloat32>{});
    case Precision::kFloat64:
      break;
  }
  return body(PrecisionTag<Precision::kFloat64>{});
}

// nullptr when both kernels of `precision` can run a layer of `hidden` units on the current device, else why not.
const char* recurrence_unsupported_reason(Precision precision, int hidden);

// Each returns the launch's error (cudaSuccess when the kernel was queued). The caller checks
// recurrence_unsupported_reason first; an unsupported shape returns cudaErrorInvalidConfiguration.
cudaError_t lstm_forward_bf16(const RecurrenceForwardArgs<__nv_bfloat16, float>& args, cudaStream_t stream);
cudaError_t lstm_forward_fp16(const RecurrenceForwardArgs<__half, float>& args, cudaStream_t stream);
cudaError_t lstm_forward_tf32(const RecurrenceForwardArgs<float, float>& args, cudaStream_t stream);
cudaError_t lstm_forward_fp32(const RecurrenceForwardArgs<float, float>& args, cudaStream_t stream);
cudaError_t lstm_forward_fp64(const RecurrenceForwardArgs<double, double>& args, cudaStream_t stream);

cudaError_t lstm_backward_bf16(const RecurrenceBackwardArgs<__nv_bfloat16, float>& args, cudaStream_t stream);
cudaError_t lstm_backward_fp16(const RecurrenceBackwardArgs<__half, float>& args, cudaStream_t stream);
cudaError_t lstm_backward_tf32(const RecurrenceBackwardArgs<float, float>& args, cudaStream_t stream);
cudaError_t lstm_backward_fp32(const RecurrenceBackwardArgs<float, float>& args, cudaStream_t stream);
cudaError_t lstm_backward_fp64(const RecurrenceBackwardArgs<double, double>& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace rnn_fast
