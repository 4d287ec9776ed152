// The backward recurrence for fp16, with its variants (see lstm_backward_kernel.cuh).
#include "lstm_backward_kernel.cuh"
#include "lstm_launch_template.cuh"

RNN_FAST_RECURRENCE_ENTRY(lstm_backward_fp16, kFloat16, kBackward, float)
RNN_FAST_RECURRENCE_ENTRY(lstm_backward_fp16, kFloat16, kBackward, __half)
