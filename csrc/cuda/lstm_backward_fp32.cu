// The backward recurrence for fp32, with its variants (see lstm_backward_kernel.cuh).
#include "lstm_backward_kernel.cuh"
#include "lstm_launch_template.cuh"

RNN_FAST_RECURRENCE_ENTRY(lstm_backward_fp32, kFloat32, kBackward, float)
