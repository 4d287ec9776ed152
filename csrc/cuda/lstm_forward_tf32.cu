// The forward recurrence for tf32 (see lstm_recurrence.cuh).
#include "lstm_recurrence.cuh"

RNN_FAST_RECURRENCE_ENTRY(lstm_forward_tf32, rnn_fast::cuda::Precision::kTf32, true)
