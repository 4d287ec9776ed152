// The backward recurrence for tf32 (see lstm_recurrence.cuh).
#include "lstm_recurrence.cuh"

RNN_FAST_RECURRENCE_ENTRY(lstm_backward_tf32, rnn_fast::cuda::Precision::kTf32, false)
