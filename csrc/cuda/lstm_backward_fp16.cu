// The backward recurrence for fp16 (see lstm_recurrence.cuh).
#include "lstm_recurrence.cuh"

RNN_FAST_RECURRENCE_ENTRY(lstm_backward_fp16, rnn_fast::cuda::Precision::kFloat16, false)
