// Kernel 1 forward on CUDA: one block per token row; each thread keeps an online (max, sum-exp,
// sum e*(z-m)) over 16-byte packs of the row, then a CUB block reduction merges the threads.
// Only the first `valid` columns are read (the rest is vocabulary padding).
//
// Rescaling writes a*(q + d*s) as a*q + (a*d)*s: with a = exp(d) = 0 for a huge negative d the
// product a*d is 0, while d*s alone overflows to -inf and 0*-inf = NaN. Padding masked with
// bf16 finfo.min/2 (-1.7e38) hit this whenever a thread saw only padding (rows of < 2,048 real
// bf16 columns: 256 threads x 8 per pack), giving NaN entropies (defect 11).
#include <cub/block/block_reduce.cuh>

#include "common.cuh"
#include "launch.h"

namespace popo {
namespace {

constexpr int kThreads = 256;

struct Online {
  float m, s, q;  // max, sum exp(z - m), sum exp(z - m) (z - m)
};

__device__ __forceinline__ Online merge(Online a, Online b) {
  if (a.m == -INFINITY) return b;
  if (b.m == -INFINITY) return a;
  float M = fmaxf(a.m, b.m);
  float da = a.m - M, db = b.m - M;
  float ea = __expf(da), eb = __expf(db);
  return {M, a.s * ea + b.s * eb, (ea * a.q + (ea * da) * a.s) + (eb * b.q + (eb * db) * b.s)};
}

struct Merge {
  __device__ __forceinline__ Online operator()(const Online& a, const Online& b) const { return merge(a, b); }
};

template <int N>
__device__ __forceinline__ void add_values(Online& o, const float* z) {
  float cm = z[0];
#pragma unroll
  for (int i = 1; i < N; ++i) cm = fmaxf(cm, z[i]);
  if (cm > o.m) {  // rescale the running sums to the new max once per pack
    if (o.m == -INFINITY) {
      o.s = 0.f;
      o.q = 0.f;
    } else {
      float d = o.m - cm, a = __expf(d);
      o.q = a * o.q + (a * d) * o.s;
      o.s = a * o.s;
    }
    o.m = cm;
  }
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float d = z[i] - o.m, e = __expf(d);
    o.s += e;
    o.q += e * d;
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const T* __restrict__ logits, int64_t cols, int64_t valid,
                                                       const int64_t* __restrict__ target, int64_t vocab_start,
                                                       int64_t rows, float* __restrict__ stats) {
  using Reduce = cub::BlockReduce<Online, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t r = blockIdx.x;
  const T* z = logits + r * cols;
  Online o{-INFINITY, 0.f, 0.f};
  int64_t scalar_from = 0;  // the scalar loop covers [scalar_from, valid)
  if (kVec) {
    constexpr int N = Pack<T>::N;
    const int64_t packed = valid / N * N;  // whole packs of real columns; the tail goes scalar
    for (int64_t v = int64_t(threadIdx.x) * N; v < packed; v += int64_t(kThreads) * N) {
      float x[N];
      ld_pack(z + v, x);
      add_values<N>(o, x);
    }
    scalar_from = packed;
  }
  for (int64_t v = scalar_from + threadIdx.x; v < valid; v += kThreads) {
    float x = ld(z + v);
    add_values<1>(o, &x);
  }
  Online total = Reduce(tmp).Reduce(o, Merge());
  if (threadIdx.x == 0) {
    stats[r] = total.m;
    stats[rows + r] = total.s;
    stats[2 * rows + r] = total.q;
    int64_t local = target[r] - vocab_start;
    stats[3 * rows + r] = (local >= 0 && local < valid) ? ld(z + local) : 0.f;
  }
}

template <typename T>
cudaError_t launch(const void* logits, int64_t rows, int64_t cols, int64_t valid, const int64_t* target,
                   int64_t vocab_start, float* stats, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const T* z = static_cast<const T*>(logits);
  if (rows_vectorizable<T>(logits, cols))
    fwd_kernel<T, true><<<unsigned(rows), kThreads, 0, stream>>>(z, cols, valid, target, vocab_start, rows, stats);
  else
    fwd_kernel<T, false><<<unsigned(rows), kThreads, 0, stream>>>(z, cols, valid, target, vocab_start, rows, stats);
  return cudaGetLastError();
}

}  // namespace

cudaError_t logprob_entropy_fwd_cuda(const void* logits, DType dtype, int64_t rows, int64_t cols, int64_t valid,
                                     const int64_t* target, int64_t vocab_start, float* stats, cudaStream_t stream) {
  if (dtype == DType::F32) return launch<float>(logits, rows, cols, valid, target, vocab_start, stats, stream);
  return launch<__nv_bfloat16>(logits, rows, cols, valid, target, vocab_start, stats, stream);
}

}  // namespace popo
