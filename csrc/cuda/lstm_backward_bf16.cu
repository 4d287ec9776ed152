// The backward recurrence for bf16, with its variants (see lstm_backward_kernel.cuh).
#include "lstm_backward_kernel.cuh"
#include "lstm_launch_template.cuh"

RNN_FAST_RECURRENCE_ENTRY(lstm_backward_bf16, kBfloat16, kBackward, float)
RNN_FAST_RECURRENCE_ENTRY(lstm_backward_bf16, kBfloat16, kBackward, __nv_bfloat16)
