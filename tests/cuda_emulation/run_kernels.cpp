// Runs one recurrence kernel of csrc/cuda on the CPU emulation of emulated_primitives.h, with the launch shape
// the production planner picks, and writes its outputs. Driven by tests/test_cuda_emulation.py:
//
//   run_kernels <bf16|fp16|tf32|fp32|fp64> <forward|backward> <tiles> <compute major> <folder> D T B H <0|1 lengths>
//
// reads <folder>/<input>.bin (raw little-endian arrays of the contract's dtypes), writes <folder>/<output>.bin,
// and prints the launch shape. Outputs start as 0xFF bytes, so elements the kernel never writes read as NaN.
// With <folder> "-" it only prints the launch shape (the planner's choice for that hidden size).
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "lstm_recurrence.cuh"

namespace {

namespace rc = rnn_fast::cuda;
namespace detail = rnn_fast::cuda::detail;

struct Options {
  std::string folder;  // "-": plan only
  int major, directions, seq_len, batch, hidden;
  bool lengths;
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

template <rc::Precision P, bool kForward, int MT>
int run(const Options& o) {
  using K = detail::KernelFor<P, kForward>;
  using Elem = typename K::Traits::Elem;
  using State = typename K::Policy::State;
  const detail::DeviceLimits device{o.major, 132, o.major >= 9 ? 227 * 1024 : 163 * 1024};
  const detail::LaunchShape shape = K::shape(o.hidden, MT, device);
  if (!shape.ok) {
    std::printf("unsupported\n");
    return 3;
  }
  std::printf("cluster=%d warps=%d hidden_padded=%d shared_bytes=%zu\n", shape.layout.cluster, shape.layout.warps,
              shape.layout.hidden_padded, shape.shared_bytes);
  if (o.folder == "-") return 0;
  const size_t D = o.directions, T = o.seq_len, B = o.batch, H = o.hidden;
  const size_t state = D * B * H, sequence = D * T * B * H;
  const std::vector<int64_t> lengths = o.lengths ? read<int64_t>(o, "lengths", B) : std::vector<int64_t>();
  const int64_t* lengths_ptr = o.lengths ? lengths.data() : nullptr;
  const dim3 grid = detail::launch_grid(shape, MT, o.batch, o.directions), block = detail::launch_block(shape);
  const auto w_hh = read<Elem>(o, "w_hh", D * 4 * H * H);
  const auto c0 = read<Elem>(o, "c0", state);
  if constexpr (kForward) {
    const auto xw = read<Elem>(o, "xw", 4 * sequence);
    const auto h0 = read<Elem>(o, "h0", state);
    auto y = poisoned<Elem>(sequence), h_n = poisoned<Elem>(state), c_n = poisoned<Elem>(state);
    auto gates = poisoned<State>(4 * sequence), cell = poisoned<State>(sequence);
    const typename K::Args args{xw.data(),   w_hh.data(), h0.data(),    c0.data(),   lengths_ptr,
                                y.data(),    h_n.data(),  c_n.data(),   gates.data(), cell.data(),
                                o.directions, o.seq_len,  o.batch,      o.hidden};
    emu::launch(K::template get<MT>(), grid, block, shape.layout.cluster, shape.shared_bytes,
                detail::Problem<typename K::Args>{args, shape.layout, detail::paired_io(args)});
    write(o, "y", y), write(o, "h_n", h_n), write(o, "c_n", c_n), write(o, "gates", gates), write(o, "cell", cell);
  } else {
    const auto grad_y = read<Elem>(o, "grad_y", sequence);
    const auto grad_h_n = read<Elem>(o, "grad_h_n", state), grad_c_n = read<Elem>(o, "grad_c_n", state);
    const auto gates = read<State>(o, "gates", 4 * sequence), cell = read<State>(o, "cell", sequence);
    auto grad_xw = poisoned<Elem>(4 * sequence), grad_h0 = poisoned<Elem>(state), grad_c0 = poisoned<Elem>(state);
    const typename K::Args args{grad_y.data(), grad_h_n.data(), grad_c_n.data(), w_hh.data(), c0.data(),
                                gates.data(),  cell.data(),     lengths_ptr,     grad_xw.data(), grad_h0.data(),
                                grad_c0.data(), o.directions,   o.seq_len,       o.batch,       o.hidden};
    emu::launch(K::template get<MT>(), grid, block, shape.layout.cluster, shape.shared_bytes,
                detail::Problem<typename K::Args>{args, shape.layout, detail::paired_io(args)});
    write(o, "grad_xw", grad_xw), write(o, "grad_h0", grad_h0), write(o, "grad_c0", grad_c0);
  }
  return 0;
}

template <rc::Precision P, bool kForward>
int run_tiles(int tiles, const Options& o) {
  if (tiles == 1) return run<P, kForward, 1>(o);
  if constexpr (detail::KernelFor<P, kForward>::kMaxTiles >= 2) {
    if (tiles == 2) return run<P, kForward, 2>(o);
  }
  std::printf("unsupported\n");
  return 3;
}

template <rc::Precision P>
int run_direction(const std::string& direction, int tiles, const Options& o) {
  return direction == "forward" ? run_tiles<P, true>(tiles, o) : run_tiles<P, false>(tiles, o);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 11) {
    std::fprintf(stderr, "usage: %s precision direction tiles major folder D T B H lengths\n", argv[0]);
    return 2;
  }
  const std::string precision = argv[1], direction = argv[2];
  const int tiles = std::atoi(argv[3]);
  const Options o{argv[5],           std::atoi(argv[4]), std::atoi(argv[6]), std::atoi(argv[7]),
                  std::atoi(argv[8]), std::atoi(argv[9]), std::atoi(argv[10]) != 0};
  if (precision == "bf16") return run_direction<rc::Precision::kBfloat16>(direction, tiles, o);
  if (precision == "fp16") return run_direction<rc::Precision::kFloat16>(direction, tiles, o);
  if (precision == "tf32") return run_direction<rc::Precision::kTf32>(direction, tiles, o);
  if (precision == "fp32") return run_direction<rc::Precision::kFloat32>(direction, tiles, o);
  if (precision == "fp64") return run_direction<rc::Precision::kFloat64>(direction, tiles, o);
  std::fprintf(stderr, "unknown precision %s\n", precision.c_str());
  return 2;
}
