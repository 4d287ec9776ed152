// Inference through a whole stack of layers in one op (rnn_fast::cpu_lstm_inference): nn.RNNBase's parameters read
// where they lie (no stacked copies), no Python between layers, each layer's final state written straight into
// h_n and c_n. Each thread projects its own block of rows a chunk of steps at a time, just before it runs them, so
// no layer's whole xw exists (nn.LSTM's peak memory or less) and each chunk stays in cache. A unidirectional stack of
// a few batch rows, whose one block per layer would leave the other threads idle, may run its layers at once: layer l
// takes a chunk of steps as soon as layer l-1 has finished it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <thread>
#include <tuple>
#include <vector>

// step_progress.h's system headers, here so that they come before vectorise.h's pragma (through recurrence.h).
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <omp.h>

#include "../recurrence_checks.h"
#include "blas.h"
#include "checks.h"
#include "input_projection.h"
#include "ops.h"
#include "output_cache.h"
#include "recurrence.h"
#include "step_layout.h"
#include "step_progress.h"
#include "work_partition.h"

namespace rnn_fast::cpu {

namespace {

// The layers of a stack run at once when they divide evenly among the threads (2 layers on 3 threads would leave one
// idle, 3 layers on 2 would make one thread's work twice the other's) and their weights are small: from H = 650 on,
// a crew per layer (work_partition.h) reads each step's weights faster than one thread can (benchmarks/NOTES.md).
constexpr int64_t kPipelineMaxRows = 16;   // batch rows up to which the layers of a stack run at once
constexpr int64_t kPipelineMaxHidden = 512;
constexpr int64_t kPipelineSteps = 8;      // steps per chunk there: the lag between one layer and the next
constexpr int64_t kChunkBytes = 1 << 20;   // otherwise, a block's chunk of xw: within L2 with the weights
// Packed-weight slots: a work item's w_hh takes the first four (one per gate when it owns a share of the units),
// its parts of w_ih the ones after.
constexpr int kGateSlots = 4;

template <typename scalar_t>
struct StackLayer {
  PartsView<scalar_t> input;
  std::array<Weights<scalar_t>, 2> w_ih;  // bf16 for bf16 products (bf16 weights, float32 input and state)
  std::array<std::vector<scalar_t>, 2> bias;  // b_ih + b_hh of each direction, empty without biases
  ForwardTensors<scalar_t> recurrence;        // xw unused: chunks of it come from project_chunk
};

// The input projection of one direction of a layer for one work item's rows and gate columns, GEMMs per part of its
// input.
template <typename scalar_t>
struct ChunkProjection {
  std::vector<GateGemms<scalar_t>> parts;

  // slot: the first of the parts' packed-weight slots.
  ChunkProjection(const StackLayer<scalar_t>& layer, const WorkItem& item, int64_t H, int64_t calls, int64_t rows,
                  int slot) {
    const int64_t P = layer.input.P, K = layer.input.K;
    const GateColumns columns(item, H);
    for (int64_t p = 0; p < P; ++p) {
      parts.emplace_back(layer.w_ih[item.direction] + p * K, K, P * K, columns, calls, rows,
                         slot + static_cast<int>(p * columns.blocks()), item.gemm);
    }
  }
};

// Projects the rows and columns of `item` for the processing steps [first, last) of its direction into a chunk
// buffer.
template <typename scalar_t>
XwChunk<scalar_t> project_chunk(const StackLayer<scalar_t>& layer, const ChunkProjection<scalar_t>& projection,
                                const StepLayout& layout, const WorkItem& item, int64_t first, int64_t last,
                                scalar_t* buffer, int64_t H) {
  const int64_t d = item.direction, rows = item.rows(), G = 4 * H;
  const int64_t first_time = d == 0 ? first : layout.T - last, last_time = d == 0 ? last : layout.T - first;
  const std::array<const scalar_t*, 2> bias{layer.bias[d].empty() ? nullptr : layer.bias[d].data(), nullptr};
  const GateColumns columns(item, H);
  auto part_gemm = [&](int64_t, int64_t p, const scalar_t* in, int64_t in_ld, scalar_t* out, int64_t out_ld,
                       int64_t n) { projection.parts[p](in, in_ld, out, out_ld, n); };
  PartsView<scalar_t> view = layer.input;
  if (layout.padded) {
    // Times [first_time, last_time) of the item's rows: one GEMM when they follow each other, else one per step.
    view.data += first_time * view.step_stride + item.begin * view.row_stride;
    view.T = last_time - first_time;
    view.B = rows;
    project_parts(view, bias, buffer, 0, 1, columns, false, part_gemm);
  } else {
    // One GEMM per step over the item's rows that run it (a prefix: rows are sorted by length).
    for (int64_t t = first_time; t < last_time; ++t) {
      const int64_t running = std::min(item.end, layout.step_begin[t + 1] - layout.step_begin[t]) - item.begin;
      if (running > 0) {
        PartsView<scalar_t> step = view;
        step.data += (layout.step_begin[t] + item.begin) * view.row_stride;
        step.B = running;
        project_parts(step, bias, buffer + (t - first_time) * rows * G, 0, 1, columns, false, part_gemm);
      }
    }
  }
  return {buffer, first_time, rows};
}

// One layer, its work items on the threads, each running chunk after chunk. A crew shares its chunk buffer, each
// thread projecting its own gate columns into it.
template <typename scalar_t>
void run_layer_in_chunks(const StackLayer<scalar_t>& layer, const StepLayout& layout, int64_t H,
                         const std::vector<WorkItem>& items) {
  const int64_t G = 4 * H;
  const int64_t rows = items.front().rows();
  const int64_t steps = std::max<int64_t>(1, kChunkBytes / (rows * G * static_cast<int64_t>(sizeof(scalar_t))));
  std::vector<scalar_t> crew_buffers(has_crews(items) ? layout.D * steps * rows * G : 0);
  for_each_work_item(items, [&](const WorkItem& item) {
    const auto gemm = recurrent_gemms(layer.recurrence.w_hh[item.direction], item, H, layout.T);
    // How many GEMMs the chunks' projections make, for deciding whether packing w_ih repays itself.
    const int64_t chunks = (layout.T + steps - 1) / steps;
    PartsView<scalar_t> chunk_view = layer.input;
    chunk_view.T = std::min(steps, layout.T);
    chunk_view.B = item.rows();
    const auto blocks = projection_blocks(chunk_view, G);
    const int64_t calls = chunks * (layout.padded ? static_cast<int64_t>(blocks.size()) : chunk_view.T);
    // Rows of one projection GEMM: a whole chunk when its steps follow each other, else a step or a batch row.
    const int64_t gemm_rows = layout.padded ? blocks.front().rows : item.rows();
    const ChunkProjection<scalar_t> projection(layer, item, H, calls, gemm_rows, kGateSlots);
    scalar_t* buffer = item.crew > 1 ? crew_buffers.data() + item.direction * steps * rows * G
                                     : thread_scratch<scalar_t>(steps * item.rows() * G, 1);
    for (int64_t first = 0; first < layout.T; first += steps) {
      const int64_t last = std::min(layout.T, first + steps);
      forward_steps(layout, H, layer.recurrence, item, gemm, static_cast<scalar_t*>(nullptr), first, last,
                    project_chunk(layer, projection, layout, item, first, last, buffer, H));
    }
    settle_state(layout, H, layer.recurrence, item, layout.T);
  });
}

// All layers at once, thread k running layers k, k + team, ...: in each chunk of steps a thread runs its layers in
// order, so it never waits for itself, and layer l waits only until layer l-1 has finished the chunk.
template <typename scalar_t>
void run_layers_at_once(const std::vector<StackLayer<scalar_t>>& layers, const StepLayout& layout, int64_t H) {
  const int64_t L = static_cast<int64_t>(layers.size()), G = 4 * H, B = layout.B;
  const WorkItem all_rows{0, 0, B, 0, H, 1, 0, gemm_choice()};
  std::unique_ptr<StepProgress[]> done(new StepProgress[L]);
#pragma omp parallel num_threads(std::min<int64_t>(at::get_num_threads(), L))
  {
    const int64_t team = omp_get_num_threads(), rank = omp_get_thread_num();
    const SequentialBlas sequential;
    // Each of this thread's layers packs its w_hh and w_ih (one part: unidirectional) in slots of their own.
    std::vector<GateGemms<scalar_t>> gemms;
    std::vector<ChunkProjection<scalar_t>> projections;
    for (int64_t l = rank; l < L; l += team) {
      const int slot = 2 * static_cast<int>(gemms.size());
      gemms.push_back(recurrent_gemms(layers[l].recurrence.w_hh[0], all_rows, H, layout.T, slot));
      projections.emplace_back(layers[l], all_rows, H, layout.T, kPipelineSteps * B, slot + 1);
    }
    scalar_t* buffer = thread_scratch<scalar_t>(kPipelineSteps * B * G, 1);
    for (int64_t first = 0; first < layout.T; first += kPipelineSteps) {
      const int64_t last = std::min(layout.T, first + kPipelineSteps);
      for (int64_t l = rank, own = 0; l < L; l += team, ++own) {
        if (l > 0) {
          done[l - 1].wait_for(static_cast<int32_t>(last));
        }
        forward_steps(layout, H, layers[l].recurrence, all_rows, gemms[own], static_cast<scalar_t*>(nullptr), first,
                      last, project_chunk(layers[l], projections[own], layout, all_rows, first, last, buffer, H));
        done[l].publish(static_cast<int32_t>(last));
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_inference_cpu(const at::Tensor& input, const at::Tensor& h0,
                                                                  const at::Tensor& c0, at::TensorList params,
                                                                  bool has_biases, int64_t num_layers,
                                                                  bool bidirectional,
                                                                  const std::optional<at::Tensor>& batch_sizes) {
  const int64_t D = bidirectional ? 2 : 1, L = num_layers, per_direction = has_biases ? 4 : 2;
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(params.size()) == L * D * per_direction, "params must hold ",
              L * D * per_direction, " tensors (w_ih, w_hh", has_biases ? ", b_ih, b_hh" : "",
              " of each layer and direction, nn.RNNBase's _flat_weights), got ", params.size());
  TORCH_CHECK(params[1].dim() == 2 && params[1].size(0) == 4 * params[1].size(1) && params[1].size(1) > 0,
              "w_hh must have shape (4H, H), got ", params[1].sizes());
  const int64_t H = params[1].size(1), G = 4 * H, I = input.size(-1);
  std::vector<int64_t> lengths;
  StepLayout layout;
  if (batch_sizes.has_value()) {
    TORCH_CHECK(input.dim() == 2, "packed input must have shape (N, I), got ", input.sizes());
    check_packed_steps(input.unsqueeze(0), "input", 1, *batch_sizes);
    layout = packed_layout(D, *batch_sizes, lengths);
  } else {
    TORCH_CHECK(input.dim() == 3 && input.size(0) >= 1, "input must have shape (T, B, I) with T >= 1, got ",
                input.sizes());
    check_supported_dtype(input.scalar_type());
    TORCH_CHECK(input.device().is_cpu(), "input must be a CPU tensor, got one on ", input.device());
    layout = padded_layout(D, input.size(0), input.size(1), nullptr);
  }
  const at::Tensor x = input.stride(-1) == 1 ? input : input.contiguous();
  const auto device = x.device();
  const auto dtype = x.scalar_type();
  const int64_t B = layout.B, rows = layout.direction_rows;
  // bf16 weights with float32 input, state and biases: every product in bf16 (bf16_gemm.h), as the recurrence
  // ops take bf16 w_hh.
  const at::ScalarType weights_dtype = rnn_fast::weight_dtype(dtype, params[0], true);
  RNN_FAST_CHECK_INPUT(h0, device, dtype, L * D, B, H);
  RNN_FAST_CHECK_INPUT(c0, device, dtype, L * D, B, H);
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t d = 0; d < D; ++d) {
      const at::Tensor* p = params.data() + (l * D + d) * per_direction;
      const at::Tensor &w_ih = p[0], &w_hh = p[1];
      RNN_FAST_CHECK_INPUT(w_ih, device, weights_dtype, G, l == 0 ? I : D * H);
      RNN_FAST_CHECK_INPUT(w_hh, device, weights_dtype, G, H);
      if (has_biases) {
        const at::Tensor &b_ih = p[2], &b_hh = p[3];
        RNN_FAST_CHECK_INPUT(b_ih, device, dtype, G);
        RNN_FAST_CHECK_INPUT(b_hh, device, dtype, G);
      }
    }
  }
  check_projection_sizes(batch_sizes.has_value() ? x.view({1, 1, rows, I}) : x.unsqueeze(0), G);

  auto output = batch_sizes.has_value() ? empty_output({rows, D * H}, x.options())
                                        : empty_output({layout.T, B, D * H}, x.options());
  // The running state of every layer, updated in place step after step.
  auto h_n = h0.clone();
  auto c_n = c0.clone();
  const int64_t threads = at::get_num_threads();
  const bool at_once = D == 1 && threads >= 2 && L % threads == 0 && B <= kPipelineMaxRows &&
                       H <= kPipelineMaxHidden && layout.T >= 2 * kPipelineSteps;
  const std::vector<WorkItem> items = plan_work(layout, H);
  // The crews' other state buffer (ForwardTensors::h_other), for every layer.
  const at::Tensor h_other = !at_once && has_crews(items) ? at::empty_like(h0) : at::Tensor();
  DISPATCH_FLOAT_AND_DOUBLE(dtype, "cpu_lstm_inference", [&] {
    std::vector<StackLayer<scalar_t>> layers(L);
    std::vector<at::Tensor> outputs;  // y [D, rows, H] of the layers below the last
    PartsView<scalar_t> parts = batch_sizes.has_value()
                                    ? PartsView<scalar_t>{x.data_ptr<scalar_t>(), 1, 1, rows, I, 0, 0, x.stride(0)}
                                    : PartsView<scalar_t>{x.data_ptr<scalar_t>(), 1, layout.T, B, I, 0, x.stride(0),
                                                          x.stride(1)};
    for (int64_t l = 0; l < L; ++l) {
      StackLayer<scalar_t>& layer = layers[l];
      layer.input = parts;
      std::array<Weights<scalar_t>, 2> w_hh{};
      for (int64_t d = 0; d < D; ++d) {
        const at::Tensor* p = params.data() + (l * D + d) * per_direction;
        layer.w_ih[d] = weights_of<scalar_t>(p[0]);
        w_hh[d] = weights_of<scalar_t>(p[1]);
        if (has_biases) {
          const scalar_t* b_ih = p[2].data_ptr<scalar_t>();
          const scalar_t* b_hh = p[3].data_ptr<scalar_t>();
          for (int64_t j = 0; j < G; ++j) {
            layer.bias[d].push_back(b_ih[j] + b_hh[j]);
          }
        }
      }
      const bool last = l == L - 1;
      if (!last) {
        outputs.push_back(empty_output({D, rows, H}, x.options()));
      }
      scalar_t* y = last ? output.data_ptr<scalar_t>() : outputs.back().data_ptr<scalar_t>();
      // The last layer writes the output [rows, D*H] (directions side by side), the others y [D, rows, H].
      layer.recurrence = ForwardTensors<scalar_t>{nullptr, w_hh, y, last ? H : rows * H, last ? D * H : H,
                                                  h_n.data_ptr<scalar_t>() + l * D * B * H,
                                                  c_n.data_ptr<scalar_t>() + l * D * B * H, nullptr, nullptr};
      if (h_other.defined()) {
        layer.recurrence.h_other = h_other.data_ptr<scalar_t>() + l * D * B * H;
      }
      // The next layer's parts: this layer's y [D, T, B, H] (padded) or [D, 1, N, H] (packed).
      parts = layout.padded ? PartsView<scalar_t>{y, D, layout.T, B, H, rows * H, B * H, H}
                            : PartsView<scalar_t>{y, D, 1, rows, H, rows * H, 0, H};
      if (!at_once) {
        run_layer_in_chunks(layer, layout, H, items);
        if (outputs.size() > 1) {
          outputs.front() = at::Tensor();  // the layer below this one's input: read by now
          outputs.erase(outputs.begin());
        }
      }
    }
    if (at_once) {
      run_layers_at_once(layers, layout, H);
    }
  });
  return {output, h_n, c_n};
}

}  // namespace rnn_fast::cpu
