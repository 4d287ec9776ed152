// The forward recurrence for fp64, with its variants (see lstm_forward_kernel.cuh).
#include "lstm_forward_kernel.cuh"
#include "lstm_launch_template.cuh"

RNN_FAST_RECURRENCE_ENTRY(lstm_forward_fp64, kFloat64, kForward, double)
