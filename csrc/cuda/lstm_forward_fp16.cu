// The forward recurrence for fp16 (see lstm_recurrence.cuh).
#include "lstm_recurrence.cuh"

RNN_FAST_RECURRENCE_ENTRY(lstm_forward_fp16, rnn_fast::cuda::Precision::kFloat16, true)
