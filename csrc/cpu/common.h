// Helpers shared by the CPU kernels: bf16 <-> fp32, a vectorisable exp, per-ISA clones.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

#include "../kernels.h"

namespace popo {

using bf16_t = uint16_t;

inline float to_f32(float v) { return v; }
inline float to_f32(bf16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T> inline T from_f32(float f);
template <> inline float from_f32<float>(float f) { return f; }
template <> inline bf16_t from_f32<bf16_t>(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t(u >> 16);
}

// exp(x) in fp32 within ~2 ulp (Cephes expf polynomial after a ln2 range reduction), written
// with plain arithmetic so that the compiler vectorises loops that call it. Inputs below -87.3
// give exactly 0 (as expf underflows), never a clamped ~1e-38: callers multiply the result by x
// itself, and 1e-38 * x with x ~ -1.7e38 (bf16 padding at finfo.min/2) would add ~-2 per element
// to the entropy sums instead of 0. Inputs above 88.7 are clamped (callers pass x <= 0).
inline float exp_approx(float x) {
  const bool underflow = x < -87.3f;
  x = underflow ? -87.3f : x;
  x = x > 88.7f ? 88.7f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float n = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return underflow ? 0.f : p * scale;
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

}  // namespace popo

// Compile hot loops twice (AVX2+FMA and baseline) and pick at load time, on x86-64 with GCC.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define POPO_CLONES __attribute__((target_clones("arch=x86-64-v3", "default"))) __attribute__((noinline))
#else
#define POPO_CLONES __attribute__((noinline))
#endif
