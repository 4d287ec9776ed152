// The CPU kernels of the rnn_fast ops, one declaration each for registration.cpp to register. The contract's ops
// have their schemas in ../rnn_fast.cpp, the CPU backend's own ops in registration.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace rnn_fast::cpu {

// The recurrence contract in the padded layout [D, T, B, *] (recurrence.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_recurrence_forward_cpu(
    const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
    const std::optional<at::Tensor>& lengths);

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_recurrence_inference_cpu(
    const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
    const std::optional<at::Tensor>& lengths);

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_recurrence_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& w_hh,
    const at::Tensor& c0, const at::Tensor& gates, const at::Tensor& cell, const std::optional<at::Tensor>& lengths);

// The recurrence contract in the packed layout [D, N, *], and its grad_w_hh (packed.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_packed_recurrence_forward_cpu(
    const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& batch_sizes);

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_packed_recurrence_inference_cpu(
    const at::Tensor& xw, const at::Tensor& w_hh, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& batch_sizes);

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_packed_recurrence_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& w_hh,
    const at::Tensor& c0, const at::Tensor& gates, const at::Tensor& cell, const at::Tensor& batch_sizes);

at::Tensor packed_recurrent_weight_grad_cpu(const at::Tensor& grad_xw, const at::Tensor& y, const at::Tensor& h0,
                                            const at::Tensor& batch_sizes);

// The cpu backend's input projection and its backward (input_projection.cpp).
at::Tensor input_projection_cpu(const at::Tensor& parts, const at::Tensor& w_ih, const std::optional<at::Tensor>& bias);

std::tuple<at::Tensor, at::Tensor, at::Tensor> input_projection_backward_cpu(const at::Tensor& grad_xw,
                                                                             const at::Tensor& parts,
                                                                             const at::Tensor& w_ih,
                                                                             std::array<bool, 3> output_mask);

// Inference through a whole stack of layers (stack_inference.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_inference_cpu(const at::Tensor& input, const at::Tensor& h0,
                                                                  const at::Tensor& c0, at::TensorList params,
                                                                  bool has_biases, int64_t num_layers,
                                                                  bool bidirectional,
                                                                  const std::optional<at::Tensor>& batch_sizes);

}  // namespace rnn_fast::cpu
