// The host side of the recurrence kernels: the launch planner (cluster size, warps and shared memory per CTA
// for a hidden size), the cache of device and occupancy answers, the batch tile choice, the launch, and
// RNN_FAST_RECURRENCE_ENTRY, which defines lstm_recurrence.h's entry points. Framework-free: CUDA headers only.
// An instantiation file (lstm_<pass>_<precision>.cu) includes its kernel's header, then this one, which knows
// the kernels by their declarations in lstm_kernel_traits.cuh; lstm_plan.cu includes this one alone.
#pragma once

#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>

#include "lstm_backward_inputs.cuh"  // RingInputs: the planner gives the backward's input slots their shared memory
#include "lstm_kernel_traits.cuh"

namespace rnn_fast::cuda::detail {

struct DeviceLimits {
  int major;
  int multiprocessors;
  int shared_memory_optin;
};

inline cudaError_t query_device(int device, DeviceLimits& limits) {
  cudaError_t error = cudaDeviceGetAttribute(&limits.major, cudaDevAttrComputeCapabilityMajor, device);
  if (error == cudaSuccess) {
    error = cudaDeviceGetAttribute(&limits.multiprocessors, cudaDevAttrMultiProcessorCount, device);
  }
  if (error == cudaSuccess) {
    error = cudaDeviceGetAttribute(&limits.shared_memory_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }
  return error;
}

inline cudaError_t query_device(DeviceLimits& limits) {
  int device = 0;
  const cudaError_t error = cudaGetDevice(&device);
  return error == cudaSuccess ? query_device(device, limits) : error;
}

inline int round_up(int x, int multiple) { return (x + multiple - 1) / multiple * multiple; }

struct LaunchShape {
  bool ok;
  Layout layout;
  size_t shared_bytes;
};

// Shared memory a variant adds: the two mbarriers, and the backward's input slots (bytes per thread and slot).
struct SharedExtras {
  bool barriers;
  int ring_bytes_per_thread;
};

constexpr int kMaxRingSlots = 4;  // kBackwardPrefetch: inputs up to 3 steps ahead
constexpr int kBarrierBytes = 16;

// The smallest cluster whose CTAs have at most kMaxWarps warps and whose shared memory fits the device.
// Row strides: the state tile's are 64 bytes off a multiple of 128 so that the 8 lanes of each quarter-warp
// 16-byte read (rows g, g+1 x 4 lanes) hit distinct banks; the FMA weights' rows are 16 bytes off, so that the
// 4 column pairs a quarter-warp reads do. The input slots take what is left, up to kMaxRingSlots; fewer than 2
// (the baseline's one step ahead) leave the shape unfit.
template <class Policy, int NT>
inline LaunchShape plan_shape(int hidden, int k_per_unit, int tiles, const DeviceLimits& device,
                              const SharedExtras& extras) {
  LaunchShape shape{};
  shape.ok = false;
  if (hidden < 1 || hidden > kMaxHidden) return shape;
  const int hp = round_up(hidden, kHiddenAlign);
  const int operand = static_cast<int>(sizeof(typename Policy::Operand));
  const int k_bytes = k_per_unit * hp * operand;
  const int a_row_bytes = round_up(k_bytes, 128) + 64;
  const int w_row_bytes = round_up(k_bytes, 128) + 16;
  const int total_warps = hp / kUnitsPerWarp;
  const size_t optin = static_cast<size_t>(device.shared_memory_optin);
  for (int cluster = 1; cluster <= kMaxCluster; cluster *= 2) {
    if (cluster > 1 && device.major < 9) break;
    if (total_warps % cluster != 0 || total_warps / cluster > kMaxWarps) continue;
    const int warps = total_warps / cluster;
    const size_t weight_bytes = Policy::weight_smem_bytes(warps, NT, k_per_unit * hp, w_row_bytes);
    size_t bytes = weight_bytes + 2 * static_cast<size_t>(kTileRows) * tiles * a_row_bytes;
    const size_t barrier_bytes = extras.barriers ? kBarrierBytes : 0;
    const int ring_offset = static_cast<int>(bytes);
    int slots = 0;
    if (extras.ring_bytes_per_thread > 0) {
      const size_t slot_bytes = static_cast<size_t>(extras.ring_bytes_per_thread) * warps * kWarpSize;
      const size_t room = bytes + barrier_bytes < optin ? optin - bytes - barrier_bytes : 0;
      slots = static_cast<int>(room / slot_bytes < kMaxRingSlots ? room / slot_bytes : kMaxRingSlots);
      if (slots < 2) continue;
      bytes += slots * slot_bytes;
    }
    const int barrier_offset = static_cast<int>(bytes);
    bytes += barrier_bytes;
    if (bytes > optin) continue;
    shape.ok = true;
    shape.layout = Layout{hp, cluster, warps, a_row_bytes / operand, w_row_bytes / operand,
                          static_cast<int>(weight_bytes), ring_offset, slots, barrier_offset};
    shape.shared_bytes = bytes;
    return shape;
  }
  return shape;
}

// What precision P's kernels of pass kPass under variant set V look like.
template <Precision P, Pass kPass, unsigned V>
struct KernelFor {
  using C = Config<P, V>;
  static constexpr bool kBackward = kPass == Pass::kBackward;
  using Args = ConfigArgs<P, V, kPass>;
  template <int MT>
  static constexpr auto get() {
    if constexpr (kBackward) {
      return &lstm_backward_kernel<P, V, MT>;
    } else {
      return &lstm_forward_kernel<P, V, MT, kPass == Pass::kForward>;
    }
  }
  static constexpr int kMaxTiles = kBackward ? C::kBackwardTiles : C::kForwardTiles;
  // Variant kernels exist at the largest batch tile only, the one B=768 runs: every kernel costs seconds of nvcc
  // time, and the variants are there to be timed at that shape. The baseline has every tile.
  static constexpr int kMinTiles = V == 0 ? 1 : kMaxTiles;
  template <int MT>
  static LaunchShape shape_of(int hidden, const DeviceLimits& device) {
    if constexpr (kBackward) {
      using Ring = RingInputs<typename C::Saved, typename C::Elem, 2 * MT>;
      const SharedExtras extras{C::kMbarrier, C::ring(MT) ? Ring::kBytesPerThread : 0};
      return plan_shape<typename C::template BackwardPolicy<MT>, 1>(hidden, kGates, MT, device, extras);
    } else {
      return plan_shape<typename C::ForwardPolicy, kGates>(hidden, 1, MT, device, SharedExtras{C::kMbarrier, 0});
    }
  }
  static LaunchShape shape(int hidden, int tiles, const DeviceLimits& device) {
    if constexpr (kMaxTiles >= 2) {
      if (tiles == 2) return shape_of<2>(hidden, device);
    }
    return tiles == 1 && kMinTiles == 1 ? shape_of<1>(hidden, device) : LaunchShape{};
  }
};

template <Precision P>
inline LaunchShape forward_shape(int hidden, int tiles, const DeviceLimits& device) {
  return KernelFor<P, Pass::kForward, 0>::shape(hidden, tiles, device);
}

template <Precision P>
inline LaunchShape backward_shape(int hidden, int tiles, const DeviceLimits& device) {
  return KernelFor<P, Pass::kBackward, 0>::shape(hidden, tiles, device);
}

// `body(std::integral_constant<unsigned, V>{})` for the compiled variant set V equal to `variants` (cut down to
// applicable_variants), or cudaErrorNotSupported when the build has none: the one switch from a runtime variant
// set to the kernels' compile-time one.
template <Precision P, Pass kPass, class Body, size_t... I>
inline cudaError_t dispatch_variants(unsigned variants, Body&& body, std::index_sequence<I...>) {
  constexpr unsigned kApplicable = applicable_variants(P, kPass);
  cudaError_t result = cudaErrorNotSupported;
  const bool found =
      ((variants == (kCompiledVariantSets[I] & kApplicable) &&
        (result = body(std::integral_constant<unsigned, kCompiledVariantSets[I] & kApplicable>{}), true)) ||
       ...);
  (void)found;
  return result;
}

template <Precision P, Pass kPass, class Body>
inline cudaError_t dispatch_variants(unsigned variants, Body&& body) {
  constexpr size_t kSets = sizeof(kCompiledVariantSets) / sizeof(kCompiledVariantSets[0]);
  return dispatch_variants<P, kPass>(variants, static_cast<Body&&>(body), std::make_index_sequence<kSets>{});
}

// The occupancy queries, asked once per (device, kernel, shape) and kept: a launch then costs no driver query
// beyond cudaGetDevice and the launch itself. `Runtime` performs the queries (CudaRuntime below; the emulation
// tests count them with a stand-in). Thread-safe; a kernel's shared-memory attribute only ever grows, so a shape
// planned earlier with more shared memory still launches.
template <class Runtime>
class LaunchCache {
 public:
  cudaError_t device(int index, DeviceLimits& limits) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto found = devices_.find(index);
    if (found != devices_.end()) {
      limits = found->second;
      return cudaSuccess;
    }
    const cudaError_t error = Runtime::query_device(index, limits);
    if (error == cudaSuccess) devices_.emplace(index, limits);
    return error;
  }

  // How many clusters of `shape` the whole GPU holds at once.
  cudaError_t resident_clusters(int index, const void* kernel, const LaunchShape& shape, int multiprocessors,
                                int& clusters) {
    std::lock_guard<std::mutex> lock(mutex_);
    const ShapeKey key{index, kernel, shape.layout.cluster, shape.layout.warps, shape.shared_bytes};
    const auto found = resident_.find(key);
    if (found != resident_.end()) {
      clusters = found->second;
      return cudaSuccess;
    }
    size_t& attribute = shared_attribute_[KernelKey{index, kernel}];
    if (shape.shared_bytes > attribute) {
      const cudaError_t error = Runtime::set_shared_memory(index, kernel, shape.shared_bytes);
      if (error != cudaSuccess) return error;
      attribute = shape.shared_bytes;
    }
    const cudaError_t error = Runtime::resident_clusters(kernel, shape, multiprocessors, clusters);
    if (error == cudaSuccess) resident_.emplace(key, clusters);
    return error;
  }

 private:
  using KernelKey = std::pair<int, const void*>;
  using ShapeKey = std::tuple<int, const void*, int, int, size_t>;
  std::mutex mutex_;
  std::map<int, DeviceLimits> devices_;
  std::map<KernelKey, size_t> shared_attribute_;
  std::map<ShapeKey, int> resident_;
};

// Makes `config` launch clusters of `cluster` CTAs along x, through `attribute` (which must outlive it).
inline void set_cluster_dimension(cudaLaunchConfig_t& config, cudaLaunchAttribute& attribute, int cluster) {
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = cluster;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  config.attrs = &attribute;
  config.numAttrs = 1;
}

struct CudaRuntime {
  static cudaError_t query_device(int index, DeviceLimits& limits) { return detail::query_device(index, limits); }

  // On the current device, which is `index` (the launch asked cudaGetDevice).
  static cudaError_t set_shared_memory(int /*index*/, const void* kernel, size_t bytes) {
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  }

  static cudaError_t resident_clusters(const void* kernel, const LaunchShape& shape, int multiprocessors,
                                       int& clusters) {
    clusters = 0;
    const int threads = shape.layout.warps * kWarpSize;
    if (shape.layout.cluster == 1) {
      int blocks = 0;
      const cudaError_t error =
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, shape.shared_bytes);
      clusters = blocks * multiprocessors;
      return error;
    }
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(shape.layout.cluster, 1, 1);
    config.blockDim = dim3(threads, 1, 1);
    config.dynamicSmemBytes = shape.shared_bytes;
    cudaLaunchAttribute attribute = {};
    set_cluster_dimension(config, attribute, shape.layout.cluster);
    return cudaOccupancyMaxActiveClusters(&clusters, kernel, &config);
  }
};

inline LaunchCache<CudaRuntime>& launch_cache() {
  static LaunchCache<CudaRuntime> cache;
  return cache;
}

// grid.x: the batch tiles' clusters, side by side; grid.y: the directions.
inline dim3 launch_grid(const LaunchShape& shape, int tiles, int batch, int directions) {
  const int batch_tiles = (batch + kTileRows * tiles - 1) / (kTileRows * tiles);
  return dim3(batch_tiles * shape.layout.cluster, directions, 1);
}

inline dim3 launch_block(const LaunchShape& shape) { return dim3(shape.layout.warps * kWarpSize, 1, 1); }

template <typename T>
inline bool pair_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (2 * sizeof(T)) == 0;
}

// Whether every pair of adjacent units is one aligned vector in global memory (load_pair / store_pair). The
// inference kernels' null gates and cells count as aligned.
template <typename Elem, typename State>
inline bool paired_io(const RecurrenceForwardArgs<Elem, State>& a) {
  return a.hidden % 2 == 0 && pair_aligned(a.xw) && pair_aligned(a.h0) && pair_aligned(a.c0) && pair_aligned(a.y) &&
         pair_aligned(a.h_n) && pair_aligned(a.c_n) && pair_aligned(a.gates) && pair_aligned(a.cell);
}

template <typename Elem, typename State>
inline bool paired_io(const RecurrenceBackwardArgs<Elem, State>& a) {
  return a.hidden % 2 == 0 && pair_aligned(a.grad_y) && pair_aligned(a.grad_h_n) && pair_aligned(a.grad_c_n) &&
         pair_aligned(a.c0) && pair_aligned(a.gates) && pair_aligned(a.cell) && pair_aligned(a.grad_xw) &&
         pair_aligned(a.grad_h0) && pair_aligned(a.grad_c0);
}

template <typename Kernel, class Args>
inline cudaError_t launch_kernel(Kernel kernel, const LaunchShape& shape, int tiles, const Args& args,
                                 cudaStream_t stream) {
  cudaLaunchConfig_t config = {};
  config.gridDim = launch_grid(shape, tiles, args.batch, args.directions);
  config.blockDim = launch_block(shape);
  config.dynamicSmemBytes = shape.shared_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute = {};
  if (shape.layout.cluster > 1) set_cluster_dimension(config, attribute, shape.layout.cluster);
  return cudaLaunchKernelEx(&config, kernel, Problem<Args>{args, shape.layout, paired_io(args)});
}

// A candidate batch tile (MT m-tiles): its shape, and its cost in units of one m-tile step, counted as
// waves of resident clusters x MT (all clusters run the same T steps, so waves are real).
struct TileChoice {
  LaunchShape shape;
  int tiles;
  long long cost;
};

template <typename Kernel, class Args>
inline cudaError_t consider(Kernel kernel, const LaunchShape& shape, int tiles, const Args& args, int device_index,
                            const DeviceLimits& device, TileChoice& best) {
  if (!shape.ok) return cudaSuccess;
  int resident = 0;
  const cudaError_t error = launch_cache().resident_clusters(device_index, reinterpret_cast<const void*>(kernel),
                                                             shape, device.multiprocessors, resident);
  if (error != cudaSuccess || resident == 0) return error;
  const long long clusters =
      static_cast<long long>(args.directions) * ((args.batch + kTileRows * tiles - 1) / (kTileRows * tiles));
  const long long cost = (clusters + resident - 1) / resident * tiles;
  // On a tie the larger tile wins: fewer steps in total, so less per-step latency.
  if (best.tiles == 0 || cost <= best.cost) best = TileChoice{shape, tiles, cost};
  return cudaSuccess;
}

// The planner's tile choice for variant set V, and the launch.
template <Precision P, Pass kPass, unsigned V, class Args>
inline cudaError_t launch_variant(const Args& args, int device_index, const DeviceLimits& device,
                                  cudaStream_t stream) {
  using K = KernelFor<P, kPass, V>;
  if constexpr (!std::is_same<typename K::Args, Args>::value) {
    return cudaErrorNotSupported;  // V's saved-state type is not the args' (dispatch never gets here)
  } else {
    TileChoice best{};
    cudaError_t error = cudaSuccess;
    if constexpr (K::kMinTiles == 1) {
      error = consider(K::template get<1>(), K::shape(args.hidden, 1, device), 1, args, device_index, device, best);
    }
    if constexpr (K::kMaxTiles >= 2) {
      if (error == cudaSuccess) {
        error = consider(K::template get<2>(), K::shape(args.hidden, 2, device), 2, args, device_index, device, best);
      }
    }
    if (error != cudaSuccess) return error;
    if (best.tiles == 0) return cudaErrorInvalidConfiguration;
    if constexpr (K::kMaxTiles >= 2) {
      if (best.tiles == 2) return launch_kernel(K::template get<2>(), best.shape, 2, args, stream);
    }
    if constexpr (K::kMinTiles == 1) {
      return launch_kernel(K::template get<1>(), best.shape, 1, args, stream);
    } else {
      return cudaErrorInvalidConfiguration;
    }
  }
}

template <typename Elem, typename State>
constexpr bool saves_half(const RecurrenceForwardArgs<Elem, State>*) {
  return sizeof(State) == 2;
}
template <typename Elem, typename State>
constexpr bool saves_half(const RecurrenceBackwardArgs<Elem, State>*) {
  return sizeof(State) == 2;
}

template <Precision P, Pass kPass, class Args>
inline cudaError_t launch(const Args& args, unsigned variants, cudaStream_t stream) {
  if (args.batch == 0 || args.directions == 0 || args.seq_len == 0) return cudaSuccess;
  int device_index = 0;
  cudaError_t error = cudaGetDevice(&device_index);
  DeviceLimits device{};
  if (error == cudaSuccess) error = launch_cache().device(device_index, device);
  if (error != cudaSuccess) return error;
  // The saved-state type is the args', whatever the flag says.
  constexpr bool kHalf = saves_half(static_cast<const Args*>(nullptr));
  unsigned set = (variants & applicable_variants(P, kPass) & ~kSaved16bit) | (kHalf ? kSaved16bit : 0u);
  if (device.major < 9) {
    if (kHalf) return cudaErrorNotSupported;
    set = 0;  // variants are compiled for sm_90 only
  }
  return dispatch_variants<P, kPass>(set, [&](auto v) {
    return launch_variant<P, kPass, decltype(v)::value>(args, device_index, device, stream);
  });
}

}  // namespace rnn_fast::cuda::detail

// Defines the entry point NAME of lstm_recurrence.h for Precision::PRECISION, Pass::PASS and saved-state type
// SAVED; each lstm_<pass>_<precision>.cu holds the entries of one precision and pass, so that every kernel
// instantiation, variants included, compiles in the translation unit of its precision and pass.
#define RNN_FAST_RECURRENCE_ENTRY(NAME, PRECISION, PASS, SAVED)                                          \
  namespace rnn_fast {                                                                                   \
  namespace cuda {                                                                                       \
  cudaError_t NAME(const detail::PassArgs<Precision::PRECISION, Pass::PASS, SAVED>& args, unsigned variants, \
                   cudaStream_t stream) {                                                                \
    return detail::launch<Precision::PRECISION, Pass::PASS>(args, variants, stream);                    \
  }                                                                                                      \
  }                                                                                                      \
  }
