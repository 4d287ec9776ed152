// The backward recurrence for tf32, with its variants (see lstm_backward_kernel.cuh).
#include "lstm_backward_kernel.cuh"
#include "lstm_launch_template.cuh"

RNN_FAST_RECURRENCE_ENTRY(lstm_backward_tf32, kTf32, kBackward, float)
RNN_FAST_RECURRENCE_ENTRY(lstm_backward_tf32, kTf32, kBackward, __half)
