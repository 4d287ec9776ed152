// Op schemas of the LSTM recurrence contract (see README "The recurrence contract").
// Declared once here; each backend adds a TORCH_LIBRARY_IMPL (cpu/registration.cpp, cuda/lstm_cuda.cpp),
// and Python adds register_fake / register_autograd (rnn_fast/ops/lstm/extension.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing rnn_fast._C runs the static TORCH_LIBRARY initialisers below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(rnn_fast, m) {
  m.def(
      "lstm_recurrence_forward(Tensor xw, Tensor w_hh, Tensor h0, Tensor c0, Tensor? lengths)"
      " -> (Tensor y, Tensor h_n, Tensor c_n, Tensor gates, Tensor cell)");
  m.def(
      "lstm_recurrence_backward(Tensor grad_y, Tensor grad_h_n, Tensor grad_c_n, Tensor w_hh,"
      " Tensor c0, Tensor gates, Tensor cell, Tensor? lengths)"
      " -> (Tensor grad_xw, Tensor grad_h0, Tensor grad_c0)");
  // The forward without the saved gates and cells, for calls that will not be differentiated.
  m.def(
      "lstm_recurrence_inference(Tensor xw, Tensor w_hh, Tensor h0, Tensor c0, Tensor? lengths)"
      " -> (Tensor y, Tensor h_n, Tensor c_n)");
  // The packed layout: step tensors [D, N, *] in PackedSequence data order, with its batch_sizes [T] (CPU int64).
  m.def(
      "lstm_packed_recurrence_forward(Tensor xw, Tensor w_hh, Tensor h0, Tensor c0, Tensor batch_sizes)"
      " -> (Tensor y, Tensor h_n, Tensor c_n, Tensor gates, Tensor cell)");
  m.def(
      "lstm_packed_recurrence_backward(Tensor grad_y, Tensor grad_h_n, Tensor grad_c_n, Tensor w_hh,"
      " Tensor c0, Tensor gates, Tensor cell, Tensor batch_sizes)"
      " -> (Tensor grad_xw, Tensor grad_h0, Tensor grad_c0)");
  m.def(
      "lstm_packed_recurrence_inference(Tensor xw, Tensor w_hh, Tensor h0, Tensor c0, Tensor batch_sizes)"
      " -> (Tensor y, Tensor h_n, Tensor c_n)");
}
