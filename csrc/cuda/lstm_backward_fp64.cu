// The backward recurrence for fp64 (see lstm_recurrence.cuh).
#include "lstm_recurrence.cuh"

RNN_FAST_RECURRENCE_ENTRY(lstm_backward_fp64, rnn_fast::cuda::Precision::kFloat64, false)
