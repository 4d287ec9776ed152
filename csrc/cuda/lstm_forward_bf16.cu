// The forward recurrence for bf16, with its variants (see lstm_forward_kernel.cuh).
#include "lstm_forward_kernel.cuh"
#include "lstm_launch_template.cuh"

RNN_FAST_RECURRENCE_ENTRY(lstm_forward_bf16, kBfloat16, kForward, float)
RNN_FAST_RECURRENCE_ENTRY(lstm_forward_bf16, kBfloat16, kForward, __nv_bfloat16)
