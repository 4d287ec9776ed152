// The BLAS the CPU kernels call directly, declared here (the build has libtorch_cpu's exported symbols but no BLAS
// headers), and the wrappers they call it through.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

// The Fortran BLAS that ATen itself calls (MKL in the PyTorch wheels, exported by libtorch_cpu). Called
// inside our parallel region, MKL runs single-threaded, which is what the row partition wants.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
// MKL's per-thread thread count, through its Fortran interface like the GEMMs above, where MKL is the BLAS
// (weak: absent from other BLAS builds). Returns the previous setting.
int mkl_set_num_threads_local_(const int* threads) __attribute__((weak));
// MKL's packed single-precision GEMM (weak, as above; MKL_INT is int in the LP64 interface torch links).
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace rnn_fast::cpu {

// Rows per GEMM + elementwise sub-block: small enough that the GEMM's output is still in L2 when the
// elementwise pass reads it, large enough to keep the GEMM efficient.
constexpr int64_t kRowsPerSubBlock = 128;

// Row-major views of column-major calls.
inline void blas_gemm(const char* transa, const char* transb, int m, int n, int k, const float* a, int lda,
                      const float* b, int ldb, float beta, float* c, int ldc) {
  const float one = 1.0f;
  sgemm_(transa, transb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
}

inline void blas_gemm(const char* transa, const char* transb, int m, int n, int k, const double* a, int lda,
                      const double* b, int ldb, double beta, double* c, int ldc) {
  const double one = 1.0;
  dgemm_(transa, transb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
}

// out[n, M] += in[n, K] @ op(W), for a weight W that stays fixed over many calls of few rows: a recurrence's steps,
// a stack's chunks. op(W) = W^T for W [M, K] (transposed) or W for W [K, M], rows ldw apart. Where MKL provides its
// packed GEMM (float), W goes into MKL's packed format once, which about halves a GEMM of 1 to 16 rows (4.3 -> 2.3
// us for one row of w_hh at H = 128); packing costs about what 15 such calls save, so only a user that makes at
// least kMinCallsToPack calls packs.
constexpr int64_t kMinCallsToPack = 16;

// Packed weights per thread, kept across calls (MKL asks for the matrix plus about 5.3 MB, of which it writes little):
// one per weight a thread uses at once (slot): a thread that owns a share of the units packs w_hh as one block per
// gate (4 slots), and the whole-stack inference its w_ih too, a block per gate and part of the input (8 more).
constexpr int kPackedWeightSlots = 12;

class PackedWeightBuffer {
 public:
  static float* get(size_t bytes, int slot) {
    thread_local std::array<PackedWeightBuffer, kPackedWeightSlots> buffers;
    PackedWeightBuffer& buffer = buffers[slot];
    if (buffer.bytes_ < bytes) {
      std::free(buffer.data_);
      buffer.data_ = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
      buffer.bytes_ = buffer.data_ == nullptr ? 0 : bytes;
    }
    return static_cast<float*>(buffer.data_);
  }
  ~PackedWeightBuffer() { std::free(data_); }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

template <typename scalar_t>
class FixedWeightGemm {
 public:
  FixedWeightGemm(const scalar_t* w, int64_t m, int64_t k, int64_t ldw, bool transposed, int64_t calls,
                  int64_t rows, int slot = 0)
      : w_(w), m_(static_cast<int>(m)), k_(static_cast<int>(k)), ldw_(static_cast<int>(ldw)),
        transposed_(transposed) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (calls >= kMinCallsToPack && slot < kPackedWeightSlots && cblas_sgemm_compute != nullptr &&
          cblas_sgemm_pack != nullptr && cblas_sgemm_pack_get_size != nullptr) {
        const int n = static_cast<int>(std::min(rows, kRowsPerSubBlock));
        packed_ = PackedWeightBuffer::get(cblas_sgemm_pack_get_size(kAMatrix, m_, n, k_), slot);
        if (packed_ != nullptr) {
          cblas_sgemm_pack(kColMajor, kAMatrix, transposed ? kTrans : kNoTrans, m_, n, k_, 1.0f, w, ldw_, packed_);
        }
      }
    }
  }

  // Row-major out[rows, M] (rows out_ld apart) += in[rows, K] (rows in_ld apart) @ op(W), as column-major
  // out^T = op(W)^T @ in^T.
  void operator()(const scalar_t* in, int64_t in_ld, scalar_t* out, int64_t out_ld, int64_t rows) const {
    const int n = static_cast<int>(rows);
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (packed_ != nullptr) {
        cblas_sgemm_compute(kColMajor, kPacked, kNoTrans, m_, n, k_, packed_, ldw_, in, static_cast<int>(in_ld),
                            1.0f, out, static_cast<int>(out_ld));
        return;
      }
    }
    blas_gemm(transposed_ ? "T" : "N", "N", m_, n, k_, w_, ldw_, in, static_cast<int>(in_ld), scalar_t(1), out,
              static_cast<int>(out_ld));
  }

 private:
  // CBLAS's enumerators.
  static constexpr int kColMajor = 102, kNoTrans = 111, kTrans = 112, kPacked = 151, kAMatrix = 161;
  const scalar_t* w_;
  int m_, k_, ldw_;
  bool transposed_;
  float* packed_ = nullptr;
};

// Keeps MKL on the calling thread while it lives. Called outside a parallel region, MKL would split each small
// per-step GEMM over its own threads: a fork and a join per step, which costs more than the GEMM, and far more
// on a busy machine. Inside a parallel region it stays on one thread anyway.
class SequentialBlas {
 public:
  SequentialBlas() {
    if (mkl_set_num_threads_local_ != nullptr) {
      const int one = 1;
      previous_ = mkl_set_num_threads_local_(&one);
    }
  }
  ~SequentialBlas() {
    if (mkl_set_num_threads_local_ != nullptr) {
      mkl_set_num_threads_local_(&previous_);
    }
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  int previous_ = 0;  // 0: MKL's global setting
};

}  // namespace rnn_fast::cpu
