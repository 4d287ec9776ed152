// How the CPU backend's hot loops are compiled. Include it after the standard and torch headers: its pragma
// applies to every function defined after it, and is meant for the backend's own code only.
#pragma once

// Each elementwise pass is compiled for AVX-512, AVX2 and baseline x86-64; the loader picks one per CPU. What
// the clones call must be inlined into each of them to be compiled for its target.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// As PyTorch itself is built: without it GCC vectorises the activations for AVX-512 only.
#pragma GCC optimize("no-trapping-math")
#define RNN_FAST_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define RNN_FAST_INLINE inline __attribute__((always_inline))
#else
#define RNN_FAST_TARGET_CLONES
#define RNN_FAST_INLINE inline
#endif
