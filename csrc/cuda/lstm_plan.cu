// Which (precision, hidden size) the kernels can run on the current device: the same planner the launches use.
#include "lstm_launch_template.cuh"

namespace rnn_fast {
namespace cuda {
namespace {

// Compiled with the kernels' -gencode flags: it has an image for this device exactly when they do.
__global__ void architecture_probe() {}

template <Precision P>
bool both_directions_fit(int hidden, const detail::DeviceLimits& device) {
  return detail::forward_shape<P>(hidden, 1, device).ok && detail::backward_shape<P>(hidden, 1, device).ok;
}

}  // namespace

const char* recurrence_unsupported_reason(Precision precision, int hidden) {
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes, architecture_probe) != cudaSuccess) {
    cudaGetLastError();  // not sticky; leave no error behind for the caller's next launch check
    return "rnn_fast._C has no CUDA kernels for this GPU's architecture; rebuild with RNN_FAST_CUDA_ARCHS naming it";
  }
  if (hidden < 1) return "hidden_size must be positive";
  if (hidden > detail::kMaxHidden) {
    return "the CUDA kernels keep the recurrent weights in registers, which holds hidden_size up to 128";
  }
  detail::DeviceLimits device{};
  if (detail::query_device(device) != cudaSuccess) {
    cudaGetLastError();
    return "the CUDA device's properties could not be read";
  }
  const bool fits = dispatch_precision(
      precision, [&](auto tag) { return both_directions_fit<decltype(tag)::value>(hidden, device); });
  if (fits) return nullptr;
  if (device.major < 9 && detail::round_up(hidden, detail::kHiddenAlign) > detail::kMaxWarps * detail::kUnitsPerWarp) {
    return "hidden_size above 64 needs thread block clusters, i.e. compute capability 9.0 (Hopper) or newer";
  }
  return "this dtype at this hidden_size needs more shared memory per block than this GPU has";
}

}  // namespace cuda
}  // namespace rnn_fast
