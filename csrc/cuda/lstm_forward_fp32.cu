// The forward recurrence for fp32 (see lstm_recurrence.cuh).
#include "lstm_recurrence.cuh"

RNN_FAST_RECURRENCE_ENTRY(lstm_forward_fp32, rnn_fast::cuda::Precision::kFloat32, true)
