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
  State* gates;            // [D, T, B, 4H]; the inference kernels write no gates or cells
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

// The three kernels: the forward that saves gates and cells for the backward, the forward that saves nothing
// (inference), and the backward.
enum class Pass { kForward, kInference, kBackward };

// ---------------------------------------------------------------------------------------------------------
// Kernel variants, for a GPU session to compare against the baseline (csrc/cuda/README.md, "Kernel variants").
// Bit flags; 0 is the baseline. Each kernel takes the variants that apply to its precision and pass and ignores
// the rest; all of them need sm_90 (on older GPUs the baseline runs).

enum Variant : unsigned {
  kClusterMbarrier = 1u << 0,   // the per-step cluster exchange through st.async and mbarriers, no barrier.cluster
  kSaved16bit = 1u << 1,        // saved gates and cells in 16 bits: the args' State type says it, not the flag
  kTanhApprox = 1u << 2,        // tanh.approx activations (bf16, fp16; TF32 would miss its 1e-3)
  kBackwardTf32Wide = 1u << 3,  // TF32 backward with 32-row tiles, part of W_hh in shared memory
  kBackwardPrefetch = 1u << 4,  // backward inputs staged in shared memory several steps ahead (cp.async)
};
constexpr unsigned kAllVariants =
    kClusterMbarrier | kSaved16bit | kTanhApprox | kBackwardTf32Wide | kBackwardPrefetch;

// The names of RNN_FAST_CUDA_VARIANTS (and rnn_fast/ops/lstm/cuda.py's VARIANTS), in bit order.
constexpr const char* kVariantNames[] = {"cluster_mbarrier", "saved_16bit", "tanh_approx", "bwd_tf32_wide",
                                         "bwd_prefetch"};
constexpr int kVariantCount = sizeof(kVariantNames) / sizeof(kVariantNames[0]);

// The variant sets a build has kernels for: the baseline, each variant alone and all of them together, each cut
// down to what applies to a kernel; and all but kSaved16bit, for a backward handed fp32 saved state while all
// variants are asked for. Every other combination would be more instantiations than CI can compile in its
// budget; add it here to get it.
constexpr unsigned kCompiledVariantSets[] = {0,
                                             kClusterMbarrier,
                                             kSaved16bit,
                                             kTanhApprox,
                                             kBackwardTf32Wide,
                                             kBackwardPrefetch,
                                             kAllVariants,
                                             kAllVariants & ~kSaved16bit};

// What the kernels of `precision` and `pass` can vary: the exchange always; 16-bit saved state and the
// prefetching backward only on tensor cores (IEEE float32 and float64 keep their exact arithmetic); tanh.approx
// only in bf16 and fp16, whose tolerances it keeps (in TF32 its 2^-11 error alone exceeds 1e-3 after a few
// steps; csrc/cuda/README.md); the wide backward only in TF32.
constexpr unsigned applicable_variants(Precision precision, Pass pass) {
  const bool tensor_cores = precision != Precision::kFloat32 && precision != Precision::kFloat64;
  unsigned variants = kClusterMbarrier;
  if (precision == Precision::kBfloat16 || precision == Precision::kFloat16) variants |= kTanhApprox;
  if (tensor_cores && pass != Pass::kInference) variants |= kSaved16bit;
  if (tensor_cores && pass == Pass::kBackward) variants |= kBackwardPrefetch;
  if (precision == Precision::kTf32 && pass == Pass::kBackward) variants |= kBackwardTf32Wide;
  return variants;
}

// Whether this build has the kernel for `variants` (already cut down to applicable_variants).
constexpr bool variant_set_compiled(Precision precision, Pass pass, unsigned variants) {
  for (unsigned set : kCompiledVariantSets) {
    if ((set & applicable_variants(precision, pass)) == variants) return true;
  }
  return false;
}

// Parses a comma-separated list of kVariantNames (spaces around names and empty entries are ignored) into
// `variants`. Returns false on an unknown name, then `bad` and `bad_length` point at it.
inline bool parse_variants(const char* text, unsigned& variants, const char*& bad, int& bad_length) {
  variants = 0;
  for (const char* p = text; p != nullptr && *p != '\0';) {
    while (*p == ' ' || *p == ',') ++p;
    const char* end = p;
    while (*end != '\0' && *end != ',') ++end;
    const char* last = end;
    while (last > p && last[-1] == ' ') --last;
    const int length = static_cast<int>(last - p);
    if (length > 0) {
      int found = -1;
      for (int v = 0; v < kVariantCount; ++v) {
        const char* name = kVariantNames[v];
        int n = 0;
        while (name[n] != '\0' && n < length && name[n] == p[n]) ++n;
        if (n == length && name[n] == '\0') found = v;
      }
      if (found < 0) {
        bad = p;
        bad_length = length;
        return false;
      }
      variants |= 1u << found;
    }
    p = end;
  }
  return true;
}

// The 16-bit type of the saved gates and cells under kSaved16bit: the input's own for bf16/fp16, fp16 for TF32
// (its 11 significant bits are TF32's; gates lie in [-1, 1], cells stay far below fp16's 65504).
template <Precision P>
struct SavedHalf {
  using type = void;  // IEEE float32 and float64 keep fp32 / fp64 state
};
template <>
struct SavedHalf<Precision::kBfloat16> {
  using type = __nv_bfloat16;
};
template <>
struct SavedHalf<Precision::kFloat16> {
  using type = __half;
};
template <>
struct SavedHalf<Precision::kTf32> {
  using type = __half;
};

// nullptr when both kernels of `precision` can run a layer of `hidden` units on the current device, else why not.
const char* recurrence_unsupported_reason(Precision precision, int hidden);

// Each returns the launch's error (cudaSuccess when the kernel was queued). The caller checks
// recurrence_unsupported_reason first; an unsupported shape returns cudaErrorInvalidConfiguration, a variant
// set this build has no kernel for (variant_set_compiled) cudaErrorNotSupported. `variants` is a set of Variant
// flags; kSaved16bit in it is ignored, the args' State type (float / double, or SavedHalf) decides. The
// inference entries write no gates or cells (they may be null).
cudaError_t lstm_forward_bf16(const RecurrenceForwardArgs<__nv_bfloat16, float>& args, unsigned variants,
                              cudaStream_t stream);
cudaError_t lstm_forward_bf16(const RecurrenceForwardArgs<__nv_bfloat16, __nv_bfloat16>& args, unsigned variants,
                              cudaStream_t stream);
cudaError_t lstm_forward_fp16(const RecurrenceForwardArgs<__half, float>& args, unsigned variants,
                              cudaStream_t stream);
cudaError_t lstm_forward_fp16(const RecurrenceForwardArgs<__half, __half>& args, unsigned variants,
                              cudaStream_t stream);
cudaError_t lstm_forward_tf32(const RecurrenceForwardArgs<float, float>& args, unsigned variants, cudaStream_t stream);
cudaError_t lstm_forward_tf32(const RecurrenceForwardArgs<float, __half>& args, unsigned variants,
                              cudaStream_t stream);
cudaError_t lstm_forward_fp32(const RecurrenceForwardArgs<float, float>& args, unsigned variants, cudaStream_t stream);
cudaError_t lstm_forward_fp64(const RecurrenceForwardArgs<double, double>& args, unsigned variants,
                              cudaStream_t stream);

cudaError_t lstm_inference_bf16(const RecurrenceForwardArgs<__nv_bfloat16, float>& args, unsigned variants,
                                cudaStream_t stream);
cudaError_t lstm_inference_fp16(const RecurrenceForwardArgs<__half, float>& args, unsigned variants,
                                cudaStream_t stream);
cudaError_t lstm_inference_tf32(const RecurrenceForwardArgs<float, float>& args, unsigned variants,
                                cudaStream_t stream);
cudaError_t lstm_inference_fp32(const RecurrenceForwardArgs<float, float>& args, unsigned variants,
                                cudaStream_t stream);
cudaError_t lstm_inference_fp64(const RecurrenceForwardArgs<double, double>& args, unsigned variants,
                                cudaStream_t stream);

cudaError_t lstm_backward_bf16(const RecurrenceBackwardArgs<__nv_bfloat16, float>& args, unsigned variants,
                               cudaStream_t stream);
cudaError_t lstm_backward_bf16(const RecurrenceBackwardArgs<__nv_bfloat16, __nv_bfloat16>& args, unsigned variants,
                               cudaStream_t stream);
cudaError_t lstm_backward_fp16(const RecurrenceBackwardArgs<__half, float>& args, unsigned variants,
                               cudaStream_t stream);
cudaError_t lstm_backward_fp16(const RecurrenceBackwardArgs<__half, __half>& args, unsigned variants,
                               cudaStream_t stream);
cudaError_t lstm_backward_tf32(const RecurrenceBackwardArgs<float, float>& args, unsigned variants,
                               cudaStream_t stream);
cudaError_t lstm_backward_tf32(const RecurrenceBackwardArgs<float, __half>& args, unsigned variants,
                               cudaStream_t stream);
cudaError_t lstm_backward_fp32(const RecurrenceBackwardArgs<float, float>& args, unsigned variants,
                               cudaStream_t stream);
cudaError_t lstm_backward_fp64(const RecurrenceBackwardArgs<double, double>& args, unsigned variants,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace rnn_fast
