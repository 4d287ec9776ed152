// The CPU backend of rnn_fast: the schemas of its own ops (the recurrence contract's are in ../rnn_fast.cpp) and its
// one TORCH_LIBRARY_IMPL. Its files, one a role:
//   recurrence.h, .cpp        the fused recurrence (elementwise passes, forward, backward) and the padded layout's ops
//   packed.cpp                the packed layout's ops and its grad_w_hh
//   stack_inference.cpp       inference through a whole stack of layers in one op
//   input_projection.h, .cpp  the input projection ops, and the projection the stack inference shares
//   checks.h, .cpp            what the ops check beyond ../recurrence_checks.h, and the float32/float64 dispatch
//   step_layout.h, .cpp       where each (direction, step, batch row) lies in the padded and packed layouts
//   work_partition.h, .cpp    the threads' blocks of rows, and their scratch buffers
//   step_progress.h           the step count a layer waits on in the layers-at-once stack inference (futex)
//   output_cache.h, .cpp      the cache of mapped blocks the large outputs come from
//   bf16_gemm.h, .cpp         the step GEMM in bf16 with fp32 accumulation (AVX512-BF16, or emulated)
//   blas.h                    the BLAS symbols (MKL's where present) and the GEMM wrappers
//   activations.h             sigmoid and tanh, inlined into the elementwise passes
//   vectorise.h               how the hot loops compile: target clones, forced inlining, no-trapping-math
#include <torch/library.h>

#include "bf16_gemm.h"
#include "ops.h"
#include "output_cache.h"

TORCH_LIBRARY_FRAGMENT(rnn_fast, m) {
  // Side effect only (returns the bytes given back): call it eagerly, outside torch.compile.
  m.def("cpu_release_cached_blocks() -> int", &rnn_fast::cpu::release_cached_blocks);
  // Which kernel multiplies bf16 w_hh: "avx512_bf16", "emulated" (RNN_FAST_CPU_BF16=emulated) or "" (none).
  m.def("cpu_bf16_kernel() -> str", &rnn_fast::cpu::bf16_kernel_name);
  m.def("cpu_input_projection(Tensor parts, Tensor w_ih, Tensor? bias) -> Tensor xw");
  m.def(
      "cpu_input_projection_backward(Tensor grad_xw, Tensor parts, Tensor w_ih, bool[3] output_mask)"
      " -> (Tensor grad_parts, Tensor grad_w_ih, Tensor grad_bias)");
  m.def("cpu_packed_recurrent_weight_grad(Tensor grad_xw, Tensor y, Tensor h0, Tensor batch_sizes) -> Tensor");
  // Inference through all layers at once; params as nn.RNNBase's _flat_weights, input [T, B, I] (any strides with
  // a dense last dimension) or PackedSequence data [N, I] with its batch_sizes.
  m.def(
      "cpu_lstm_inference(Tensor input, Tensor h0, Tensor c0, Tensor[] params, bool has_biases, int num_layers,"
      " bool bidirectional, Tensor? batch_sizes) -> (Tensor output, Tensor h_n, Tensor c_n)");
}

TORCH_LIBRARY_IMPL(rnn_fast, CPU, m) {
  m.impl("lstm_recurrence_forward", &rnn_fast::cpu::lstm_recurrence_forward_cpu);
  m.impl("lstm_recurrence_backward", &rnn_fast::cpu::lstm_recurrence_backward_cpu);
  m.impl("lstm_recurrence_inference", &rnn_fast::cpu::lstm_recurrence_inference_cpu);
  m.impl("lstm_packed_recurrence_forward", &rnn_fast::cpu::lstm_packed_recurrence_forward_cpu);
  m.impl("lstm_packed_recurrence_backward", &rnn_fast::cpu::lstm_packed_recurrence_backward_cpu);
  m.impl("lstm_packed_recurrence_inference", &rnn_fast::cpu::lstm_packed_recurrence_inference_cpu);
  m.impl("cpu_packed_recurrent_weight_grad", &rnn_fast::cpu::packed_recurrent_weight_grad_cpu);
  m.impl("cpu_lstm_inference", &rnn_fast::cpu::lstm_inference_cpu);
  m.impl("cpu_input_projection", &rnn_fast::cpu::input_projection_cpu);
  m.impl("cpu_input_projection_backward", &rnn_fast::cpu::input_projection_backward_cpu);
}
