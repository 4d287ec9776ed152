// The backward recurrence for bf16 (see lstm_recurrence.cuh).
#include "lstm_recurrence.cuh"

RNN_FAST_RECURRENCE_ENTRY(lstm_backward_bf16, rnn_fast::cuda::Precision::kBfloat16, false)
