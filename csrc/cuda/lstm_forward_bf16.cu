// The forward recurrence for bf16 (see lstm_recurrence.cuh).
#include "lstm_recurrence.cuh"

RNN_FAST_RECURRENCE_ENTRY(lstm_forward_bf16, rnn_fast::cuda::Precision::kBfloat16, true)
