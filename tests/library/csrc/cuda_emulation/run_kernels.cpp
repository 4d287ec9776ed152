// Runs one recurrence kernel of csrc/cuda on the CPU emulation of emulated_primitives.h, with the launch shape
// the production planner picks, and writes its outputs. Driven by tests/library/csrc/test_cuda_emulation.py:
//
//   run_kernels <bf16|fp16|tf32|fp32|fp64> <forward|inference|backward> <tiles> <compute major> <folder>
//               D T B H <0|1 lengths> <variants>
//
// <variants> is RNN_FAST_CUDA_VARIANTS's comma-separated names, or "-" for the baseline; it selects the kernel
// through the production dispatch (applicable_variants, kCompiledVariantSets), kSaved16bit included. The driver
// reads <folder>/<input>.bin (raw little-endian arrays of the contract's dtypes; saved gates and cells in the
// kernel's saved-state type), writes <folder>/<output>.bin, and prints the launch shape, then the number of
// mma.sync the warps issued. Outputs start as 0xFF bytes, so elements the kernel never writes read as NaN. With
// <folder> "-" it only prints the launch shape (the planner's choice for that hidden size).
//
//   run_kernels cache
//
// checks detail::LaunchCache with a stand-in runtime that counts its queries, from several threads at once.
//
// The kernels' instantiations take most of the build, so the file compiles as two objects in parallel:
// -DRUN_KERNELS_PART=0 (bf16, fp16, main) and -DRUN_KERNELS_PART=1 (tf32, fp32, fp64).
#include <atomic>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <thread>
#include <vector>

#include "lstm_backward_kernel.cuh"
#include "lstm_forward_kernel.cuh"
#include "lstm_launch_template.cuh"

namespace rc = rnn_fast::cuda;
namespace detail = rnn_fast::cuda::detail;

namespace emulation_driver {

struct Options {
  std::string folder;  // "-": plan only
  int major, directions, seq_len, batch, hidden;
  bool lengths;
  unsigned variants;
};

template <typename T>
std::vector<T> read(const Options& o, const std::string& name, size_t count) {
  std::ifstream in(o.folder + "/" + name + ".bin", std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.size() != count * sizeof(T)) {
    std::fprintf(stderr, "%s: expected %zu bytes, got %zu\n", name.c_str(), count * sizeof(T), bytes.size());
    std::exit(2);
  }
  std::vector<T> out(count);
  std::memcpy(static_cast<void*>(out.data()), bytes.data(), bytes.size());
  return out;
}

template <typename T>
std::vector<T> poisoned(size_t count) {
  std::vector<T> out(count);
  std::memset(static_cast<void*>(out.data()), 0xff, count * sizeof(T));
  return out;
}

template <typename T>
void write(const Options& o, const std::string& name, const std::vector<T>& data) {
  std::ofstream(o.folder + "/" + name + ".bin", std::ios::binary)
      .write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size() * sizeof(T)));
}

template <rc::Precision P, rc::Pass kPass, unsigned V, int MT>
int run(const Options& o) {
  using K = detail::KernelFor<P, kPass, V>;
  using Elem = typename K::C::Elem;
  using Saved = typename K::C::Saved;
  const detail::DeviceLimits device{o.major, 132, o.major >= 9 ? 227 * 1024 : 163 * 1024};
  const detail::LaunchShape shape = K::shape(o.hidden, MT, device);
  if (!shape.ok) {
    std::printf("unsupported\n");
    return 3;
  }
  std::printf("cluster=%d warps=%d hidden_padded=%d shared_bytes=%zu ring_slots=%d\n", shape.layout.cluster,
              shape.layout.warps, shape.layout.hidden_padded, shape.shared_bytes, shape.layout.ring_slots);
  if (o.folder == "-") return 0;
  const size_t D = o.directions, T = o.seq_len, B = o.batch, H = o.hidden;
  const size_t state = D * B * H, sequence = D * T * B * H;
  const std::vector<int64_t> lengths = o.lengths ? read<int64_t>(o, "lengths", B) : std::vector<int64_t>();
  const int64_t* lengths_ptr = o.lengths ? lengths.data() : nullptr;
  const dim3 grid = detail::launch_grid(shape, MT, o.batch, o.directions), block = detail::launch_block(shape);
  const auto w_hh = read<Elem>(o, "w_hh", D * 4 * H * H);
  const auto c0 = read<Elem>(o, "c0", state);
  auto launch = [&](const typename K::Args& args) {
    emu::launch(K::template get<MT>(), grid, block, shape.layout.cluster, shape.shared_bytes,
                detail::Problem<typename K::Args>{args, shape.layout, detail::paired_io(args)});
  };
  if constexpr (kPass != rc::Pass::kBackward) {
    constexpr bool kSaves = kPass == rc::Pass::kForward;
    const auto xw = read<Elem>(o, "xw", 4 * sequence);
    const auto h0 = read<Elem>(o, "h0", state);
    auto y = poisoned<Elem>(sequence), h_n = poisoned<Elem>(state), c_n = poisoned<Elem>(state);
    auto gates = poisoned<Saved>(kSaves ? 4 * sequence : 0), cell = poisoned<Saved>(kSaves ? sequence : 0);
    launch(typename K::Args{xw.data(), w_hh.data(), h0.data(), c0.data(), lengths_ptr, y.data(), h_n.data(),
                            c_n.data(), kSaves ? gates.data() : nullptr, kSaves ? cell.data() : nullptr,
                            o.directions, o.seq_len, o.batch, o.hidden});
    write(o, "y", y), write(o, "h_n", h_n), write(o, "c_n", c_n);
    if (kSaves) write(o, "gates", gates), write(o, "cell", cell);
  } else {
    const auto grad_y = read<Elem>(o, "grad_y", sequence);
    const auto grad_h_n = read<Elem>(o, "grad_h_n", state), grad_c_n = read<Elem>(o, "grad_c_n", state);
    const auto gates = read<Saved>(o, "gates", 4 * sequence), cell = read<Saved>(o, "cell", sequence);
    auto grad_xw = poisoned<Elem>(4 * sequence), grad_h0 = poisoned<Elem>(state), grad_c0 = poisoned<Elem>(state);
    launch(typename K::Args{grad_y.data(), grad_h_n.data(), grad_c_n.data(), w_hh.data(), c0.data(), gates.data(),
                            cell.data(), lengths_ptr, grad_xw.data(), grad_h0.data(), grad_c0.data(), o.directions,
                            o.seq_len, o.batch, o.hidden});
    write(o, "grad_xw", grad_xw), write(o, "grad_h0", grad_h0), write(o, "grad_c0", grad_c0);
  }
  std::printf("mma=%lld\n", emu::machine().mma_count);
  return 0;
}

template <rc::Precision P, rc::Pass kPass, unsigned V>
int run_tiles(int tiles, const Options& o) {
  using K = detail::KernelFor<P, kPass, V>;
  if constexpr (K::kMinTiles == 1) {
    if (tiles == 1) return run<P, kPass, V, 1>(o);
  }
  if constexpr (K::kMaxTiles >= 2) {
    if (tiles == 2) return run<P, kPass, V, 2>(o);
  }
  std::printf("unsupported\n");
  return 3;
}

template <rc::Precision P, rc::Pass kPass>
int run_variants(int tiles, const Options& o) {
  const unsigned set = o.variants & rc::applicable_variants(P, kPass);
  int status = 4;
  const cudaError_t found = detail::dispatch_variants<P, kPass>(set, [&](auto v) {
    status = run_tiles<P, kPass, decltype(v)::value>(tiles, o);
    return cudaSuccess;
  });
  if (found != cudaSuccess) std::printf("variant set %#x not compiled\n", set);
  return status;
}

template <rc::Precision P>
int run_pass(const std::string& pass, int tiles, const Options& o) {
  if (pass == "forward") return run_variants<P, rc::Pass::kForward>(tiles, o);
  if (pass == "inference") return run_variants<P, rc::Pass::kInference>(tiles, o);
  return run_variants<P, rc::Pass::kBackward>(tiles, o);
}

#define RUN_KERNELS_INSTANTIATE(PRECISION, PART)                                                  \
  RUN_KERNELS_##PART template int run_pass<rc::Precision::PRECISION>(const std::string&, int, const Options&);
#if RUN_KERNELS_PART == 0
#define RUN_KERNELS_OWN
#define RUN_KERNELS_OTHER extern
#else
#define RUN_KERNELS_OWN extern
#define RUN_KERNELS_OTHER
#endif
RUN_KERNELS_INSTANTIATE(kBfloat16, OWN)
RUN_KERNELS_INSTANTIATE(kFloat16, OWN)
RUN_KERNELS_INSTANTIATE(kTf32, OTHER)
RUN_KERNELS_INSTANTIATE(kFloat32, OTHER)
RUN_KERNELS_INSTANTIATE(kFloat64, OTHER)

#if RUN_KERNELS_PART == 0

// A runtime whose queries count themselves and take a while, so that racing threads overlap.
struct CountingRuntime {
  static std::atomic<int> device_queries, attribute_sets, occupancy_queries;
  static std::atomic<size_t> largest_attribute[2];  // per device
  static cudaError_t query_device(int index, detail::DeviceLimits& limits) {
    ++device_queries;
    std::this_thread::yield();
    limits = detail::DeviceLimits{9, 132 + index, 227 * 1024};
    return cudaSuccess;
  }
  static cudaError_t set_shared_memory(int index, const void*, size_t bytes) {
    ++attribute_sets;
    if (bytes < largest_attribute[index]) return cudaErrorInvalidValue;  // the cache must never lower it
    largest_attribute[index] = bytes;
    return cudaSuccess;
  }
  static cudaError_t resident_clusters(const void*, const detail::LaunchShape& shape, int multiprocessors,
                                       int& clusters) {
    ++occupancy_queries;
    std::this_thread::yield();
    clusters = multiprocessors / shape.layout.cluster + static_cast<int>(shape.shared_bytes % 7);
    return cudaSuccess;
  }
};
std::atomic<int> CountingRuntime::device_queries{0}, CountingRuntime::attribute_sets{0},
    CountingRuntime::occupancy_queries{0};
std::atomic<size_t> CountingRuntime::largest_attribute[2] = {{0}, {0}};

// 8 threads x 1000 launches' worth of lookups over 2 devices x 3 shapes of one kernel: each distinct question is
// asked once, answers are the runtime's, and the shared-memory attribute is raised, never lowered.
int cache_selftest() {
  detail::LaunchCache<CountingRuntime> cache;
  const int kernel = 0;
  detail::LaunchShape shapes[3] = {};
  const size_t bytes[3] = {20 * 1024, 68 * 1024, 10 * 1024};
  for (int i = 0; i < 3; ++i) {
    shapes[i].ok = true;
    shapes[i].layout.cluster = 2;
    shapes[i].layout.warps = 8;
    shapes[i].shared_bytes = bytes[i];
  }
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int n = 0; n < 1000; ++n) {
        const int device = (n + t) % 2, which = (n / 2 + t) % 3;
        detail::DeviceLimits limits{};
        int clusters = -1;
        if (cache.device(device, limits) != cudaSuccess || limits.multiprocessors != 132 + device) ++wrong;
        if (cache.resident_clusters(device, &kernel, shapes[which], limits.multiprocessors, clusters) !=
                cudaSuccess ||
            clusters != limits.multiprocessors / 2 + static_cast<int>(bytes[which] % 7)) {
          ++wrong;
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  std::printf("device_queries=%d attribute_sets=%d occupancy_queries=%d wrong=%d\n",
              CountingRuntime::device_queries.load(), CountingRuntime::attribute_sets.load(),
              CountingRuntime::occupancy_queries.load(), wrong.load());
  return wrong == 0 && CountingRuntime::device_queries == 2 && CountingRuntime::occupancy_queries == 6 &&
                 CountingRuntime::attribute_sets <= 4
             ? 0
             : 1;
}

#endif  // RUN_KERNELS_PART == 0

}  // namespace emulation_driver

#if RUN_KERNELS_PART == 0
int main(int argc, char** argv) {
  using namespace emulation_driver;
  if (argc == 2 && std::string(argv[1]) == "cache") return cache_selftest();
  if (argc != 12) {
    std::fprintf(stderr, "usage: %s precision pass tiles major folder D T B H lengths variants\n", argv[0]);
    return 2;
  }
  const std::string precision = argv[1], pass = argv[2], variant_names = argv[11];
  const int tiles = std::atoi(argv[3]);
  unsigned variants = 0;
  const char* bad = nullptr;
  int bad_length = 0;
  if (variant_names != "-" && !rc::parse_variants(variant_names.c_str(), variants, bad, bad_length)) {
    std::fprintf(stderr, "unknown variant %.*s\n", bad_length, bad);
    return 2;
  }
  const Options o{argv[5],           std::atoi(argv[4]), std::atoi(argv[6]),      std::atoi(argv[7]),
                  std::atoi(argv[8]), std::atoi(argv[9]), std::atoi(argv[10]) != 0, variants};
  if (precision == "bf16") return run_pass<rc::Precision::kBfloat16>(pass, tiles, o);
  if (precision == "fp16") return run_pass<rc::Precision::kFloat16>(pass, tiles, o);
  if (precision == "tf32") return run_pass<rc::Precision::kTf32>(pass, tiles, o);
  if (precision == "fp32") return run_pass<rc::Precision::kFloat32>(pass, tiles, o);
  if (precision == "fp64") return run_pass<rc::Precision::kFloat64>(pass, tiles, o);
  std::fprintf(stderr, "unknown precision %s\n", precision.c_str());
  return 2;
}
#endif  // RUN_KERNELS_PART == 0
