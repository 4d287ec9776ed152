// The forward recurrence without saved state (inference) for fp32, with its variants (see lstm_forward_kernel.cuh).
#include "lstm_forward_kernel.cuh"
#include "lstm_launch_template.cuh"

RNN_FAST_RECURRENCE_ENTRY(lstm_inference_fp32, kFloat32, kInference, float)
