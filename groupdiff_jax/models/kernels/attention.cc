// Exact softmax attention for CPUs, forward and backward, as XLA FFI custom calls.
//
// Built on first use by models/cpu_kernels.py with the machine's C++ compiler (-O3 -march=native)
// against the FFI headers that ship with jaxlib. Layout: q [..., Lq, H, D], k and v [..., Lk, H, D]
// (BTNH, what the model produces), read and written in place: no transposes around the kernel.
// The packed variants take the model's qkv [..., L, 3, H, D] itself and return its gradient whole.
// One work item is one (batch, head) pair; items are spread over XLA's intra-op thread pool.
//
// Why a hand-written kernel: at SiT's 256 tokens per image XLA's CPU backend runs attention as
// many small batched dots (~100 GFLOP/s on two Zen 4 cores) plus layout copies around them; here
// the scores of a block of rows stay in L1/L2 and every product runs through one register-blocked
// micro-kernel written with GCC vector extensions (AVX-512, AVX2 or whatever -march=native has).
//
// The math, per (batch, head), with s = D^-1/2:
//   forward   S = s Q K^T, P = softmax(S) row-wise, O = P V, lse = log-sum-exp of each row of S
//   backward  P recomputed from lse; dV = P^T dO; dP = dO V^T; dS = P * (dP - rowsum(dO * O));
//             dQ = s dS K; dK = s dS^T Q
// The backward runs over blocks of keys (rows of P^T), so P^T and dS^T are produced, used and
// dropped while in cache; dQ accumulates in a per-item buffer.

#include <cmath>

#include "common.h"

namespace {

// e^x for x <= ~88: x = n ln2 + r, |r| <= ln2/2, e^r by its Taylor polynomial to degree 7
// (relative error < 1e-7, below float32's rounding), 2^n built in the exponent bits.
inline Vec Exp(Vec x) {
  x = x < Splat(-87.0f) ? Splat(-87.0f) : x;
  x = x > Splat(88.0f) ? Splat(88.0f) : x;
  const Vec shifter = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  Vec t = x * Splat(1.44269504f) + shifter;
  Vec n = t - shifter;
  Vec r = x - n * Splat(0.693145752f);  // ln2 in two parts for an exact reduction
  r = r - n * Splat(1.42860677e-6f);
  Vec p = Splat(1.0f / 5040);
  p = p * r + Splat(1.0f / 720);
  p = p * r + Splat(1.0f / 120);
  p = p * r + Splat(1.0f / 24);
  p = p * r + Splat(1.0f / 6);
  p = p * r + Splat(0.5f);
  p = p * r + Splat(1.0f);
  p = p * r + Splat(1.0f);
  IVec bits = reinterpret_cast<IVec&>(t) - reinterpret_cast<const IVec&>(shifter);
  IVec scale_bits = (bits + 127) << 23;
  return p * reinterpret_cast<Vec&>(scale_bits);
}

struct Shape {
  int64_t batch, q_len, kv_len, heads, dim;
  // Floats between consecutive tokens: of q, k, v and their gradients (3 * heads * dim when they
  // are the parts of one packed [..., L, 3, H, D] array), and of out and d_out (heads * dim).
  int64_t in_row, out_row;
  int64_t dim_pad() const { return RoundUp(dim, kLanes); }
  int64_t q_pad() const { return RoundUp(q_len, kLanes); }
  int64_t kv_pad() const { return RoundUp(kv_len, kLanes); }
  float scale() const { return 1.0f / std::sqrt(static_cast<float>(dim)); }
};

ffi::Error GetShape(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                    const ffi::Buffer<ffi::F32>& v, Shape* s) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const size_t rank = qd.size();
  if (rank < 3 || kd.size() != rank || vd.size() != rank)
    return ffi::Error::InvalidArgument("flash_cpu: q, k, v must be [..., length, heads, dim]");
  for (size_t i = 0; i < rank; ++i) {
    if (kd[i] != vd[i] || (i != rank - 3 && qd[i] != kd[i]))
      return ffi::Error::InvalidArgument("flash_cpu: q, k, v shapes disagree");
  }
  *s = Shape{1, qd[rank - 3], kd[rank - 3], qd[rank - 2], qd[rank - 1]};
  for (size_t i = 0; i + 3 < rank; ++i) s->batch *= qd[i];
  s->in_row = s->out_row = s->heads * s->dim;
  return ffi::Error::Success();
}

// qkv [..., L, 3, H, D]: q, k and v are its three parts, read (and their gradients written) in
// place at a token stride of 3 * H * D.
ffi::Error GetPackedShape(const ffi::Buffer<ffi::F32>& qkv, Shape* s) {
  auto d = qkv.dimensions();
  const size_t rank = d.size();
  if (rank < 4 || d[rank - 3] != 3)
    return ffi::Error::InvalidArgument("flash_cpu: qkv must be [..., length, 3, heads, dim]");
  *s = Shape{1, d[rank - 4], d[rank - 4], d[rank - 2], d[rank - 1]};
  for (size_t i = 0; i + 4 < rank; ++i) s->batch *= d[i];
  s->out_row = s->heads * s->dim;
  s->in_row = 3 * s->out_row;
  return ffi::Error::Success();
}

// [len][dim] rows `row` apart -> [dim][len_pad] (zero-padded columns).
void PackTransposed(const float* src, int64_t len, int64_t dim, int64_t row, int64_t len_pad,
                    float* dst) {
  for (int64_t d = 0; d < dim; ++d) {
    float* out = dst + d * len_pad;
    for (int64_t t = 0; t < len; ++t) out[t] = src[t * row + d];
    std::fill(out + len, out + len_pad, 0.0f);
  }
}

// [len][dim] rows `row` apart -> [len_pad][dim_pad] (zero-padded).
void PackRows(const float* src, int64_t len, int64_t dim, int64_t row, int64_t len_pad,
              int64_t dim_pad, float* dst) {
  for (int64_t t = 0; t < len; ++t) {
    std::memcpy(dst + t * dim_pad, src + t * row, dim * sizeof(float));
    std::fill(dst + t * dim_pad + dim, dst + (t + 1) * dim_pad, 0.0f);
  }
  std::fill(dst + len * dim_pad, dst + len_pad * dim_pad, 0.0f);
}

// The right-hand operand [len][dim], rows `row` apart: read in place when its rows are whole
// vectors, else packed. Read in place, it has only `len` rows: products over it must not run into
// the padding.
const float* RowOperand(const float* src, const Shape& s, int64_t row, int64_t len,
                        int64_t len_pad, float* scratch, int64_t* ld) {
  if (s.dim % kLanes == 0) {
    *ld = row;
    return src;
  }
  PackRows(src, len, s.dim, row, len_pad, s.dim_pad(), scratch);
  *ld = s.dim_pad();
  return scratch;
}

void ForwardItem(const Shape& s, int64_t item, const float* q, const float* k, const float* v,
                 float* out, float* lse) {
  const int64_t b = item / s.heads, h = item % s.heads;
  const int64_t dp = s.dim_pad(), kp = s.kv_pad(), row = s.in_row;
  const float scale = s.scale();
  const int64_t q0 = b * s.q_len * row + h * s.dim, k0 = b * s.kv_len * row + h * s.dim;
  const int64_t o0 = b * s.q_len * s.out_row + h * s.dim;
  float* kt = Scratch(s.dim * kp + kp * dp + kRows * kp + kRows * dp);
  float* vp = kt + s.dim * kp;
  float* scores = vp + kp * dp;
  float* o = scores + kRows * kp;
  PackTransposed(k + k0, s.kv_len, s.dim, row, kp, kt);
  int64_t ldv;
  const float* vb = RowOperand(v + k0, s, row, s.kv_len, kp, vp, &ldv);
  for (int64_t i0 = 0; i0 < s.q_len; i0 += kRows) {
    const int64_t rows = std::min<int64_t>(kRows, s.q_len - i0);
    Gemm<false>(rows, kp, s.dim, q + q0 + i0 * row, row, 1, kt, kp, scores, kp);
    float total[kRows], peak[kRows];
    for (int64_t r = 0; r < rows; ++r) {
      float* srow = scores + r * kp;
      float m = srow[0];
      int64_t j = 0;
      if (s.kv_len >= kLanes) {
        Vec peak_v = Load(srow);
        for (; j + kLanes <= s.kv_len; j += kLanes) {
          const Vec x = Load(srow + j);
          peak_v = x > peak_v ? x : peak_v;
        }
        for (int lane = 0; lane < kLanes; ++lane) m = std::max(m, peak_v[lane]);
      }
      for (; j < s.kv_len; ++j) m = std::max(m, srow[j]);
      Vec sum{};
      for (j = 0; j + kLanes <= s.kv_len; j += kLanes) {
        Vec p = Exp((Load(srow + j) - Splat(m)) * Splat(scale));
        Store(srow + j, p);
        sum += p;
      }
      float l = 0.0f;
      for (int lane = 0; lane < kLanes; ++lane) l += sum[lane];
      if (j < kp) {  // the last, partial vector: padded keys get no weight
        Store(srow + j, Exp((Load(srow + j) - Splat(m)) * Splat(scale)));
        std::fill(srow + s.kv_len, srow + kp, 0.0f);
        for (; j < s.kv_len; ++j) l += srow[j];
      }
      peak[r] = m;
      total[r] = l;
    }
    Gemm<false>(rows, dp, s.kv_len, scores, kp, 1, vb, ldv, o, dp);  // V's real rows only
    for (int64_t r = 0; r < rows; ++r) {
      const float inv = 1.0f / total[r];
      float* dst = out + o0 + (i0 + r) * s.out_row;
      for (int64_t d = 0; d < s.dim; ++d) dst[d] = o[r * dp + d] * inv;
      lse[item * s.q_len + i0 + r] = peak[r] * scale + std::log(total[r]);
    }
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse) {
  Shape s;
  if (ffi::Error error = GetShape(q, k, v, &s); error.failure()) return error;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  ParallelFor(pool, s.batch * s.heads,
              [&](int64_t item) { ForwardItem(s, item, qp, kp, vp, op, lp); });
  return ffi::Error::Success();
}

void BackwardItem(const Shape& s, int64_t item, const float* q, const float* k, const float* v,
                  const float* out, const float* lse, const float* d_out, float* d_q, float* d_k,
                  float* d_v) {
  const int64_t b = item / s.heads, h = item % s.heads;
  const int64_t dp = s.dim_pad(), qp = s.q_pad(), kvp = s.kv_pad(), row = s.in_row;
  const float scale = s.scale();
  const int64_t q0 = b * s.q_len * row + h * s.dim, k0 = b * s.kv_len * row + h * s.dim;
  const int64_t o0 = b * s.q_len * s.out_row + h * s.dim;
  // Keys per block: the block's P^T and dS^T ([block][Lq] each) stay within ~512 KiB.
  const int64_t block = std::max<int64_t>(kRows, std::min<int64_t>(8 * kRows, (1 << 16) / qp)
                                                      / kRows * kRows);
  float* qt = Scratch(2 * s.dim * qp + 3 * qp * dp + kvp * dp + 3 * qp + 2 * block * qp +
                      2 * block * dp);
  float* dot = qt + s.dim * qp;              // dO^T [D][Lq]
  float* q_rows = dot + s.dim * qp;          // Q [Lq][Dp] when packed
  float* do_rows = q_rows + qp * dp;         // dO [Lq][Dp] when packed
  float* k_rows = do_rows + qp * dp;         // K [Lk][Dp] when packed
  float* dq_acc = k_rows + kvp * dp;         // dQ / s [Lq][Dp]
  float* row_lse = dq_acc + qp * dp;         // [Lq]
  float* delta = row_lse + qp;               // rowsum(dO * O) [Lq]
  float* weights_t = delta + qp;             // P^T [block][Lq]
  float* d_scores_t = weights_t + block * qp;  // dP^T, then dS^T [block][Lq]
  float* grad = d_scores_t + block * qp;     // dV or dK rows [block][Dp]
  PackTransposed(q + q0, s.q_len, s.dim, row, qp, qt);
  PackTransposed(d_out + o0, s.q_len, s.dim, s.out_row, qp, dot);
  int64_t ldq, ldo, ldk;
  const float* qb = RowOperand(q + q0, s, row, s.q_len, qp, q_rows, &ldq);
  const float* dob = RowOperand(d_out + o0, s, s.out_row, s.q_len, qp, do_rows, &ldo);
  const float* kb = RowOperand(k + k0, s, row, s.kv_len, kvp, k_rows, &ldk);
  std::fill(dq_acc, dq_acc + qp * dp, 0.0f);
  for (int64_t i = 0; i < qp; ++i) {
    float sum = 0.0f;
    if (i < s.q_len) {
      const float* o = out + o0 + i * s.out_row;
      const float* g = d_out + o0 + i * s.out_row;
      for (int64_t d = 0; d < s.dim; ++d) sum += o[d] * g[d];
    }
    delta[i] = sum;
    row_lse[i] = i < s.q_len ? lse[item * s.q_len + i] : 0.0f;
  }
  for (int64_t j0 = 0; j0 < s.kv_len; j0 += block) {
    const int64_t keys = std::min<int64_t>(block, s.kv_len - j0);
    Gemm<false>(keys, qp, s.dim, k + k0 + j0 * row, row, 1, qt, qp, weights_t, qp);    // S^T / s
    Gemm<false>(keys, qp, s.dim, v + k0 + j0 * row, row, 1, dot, qp, d_scores_t, qp);  // dP^T
    for (int64_t r = 0; r < keys; ++r) {
      float* p = weights_t + r * qp;
      float* ds = d_scores_t + r * qp;
      for (int64_t i = 0; i < qp; i += kLanes) {
        Vec pv = Exp(Load(p + i) * Splat(scale) - Load(row_lse + i));
        Store(p + i, pv);
        Store(ds + i, pv * (Load(ds + i) - Load(delta + i)));
      }
      std::fill(p + s.q_len, p + qp, 0.0f);  // padded queries: no weight, no gradient
      std::fill(ds + s.q_len, ds + qp, 0.0f);
    }
    Gemm<false>(keys, dp, s.q_len, weights_t, qp, 1, dob, ldo, grad, dp);  // dV = P^T dO
    for (int64_t r = 0; r < keys; ++r)
      std::memcpy(d_v + k0 + (j0 + r) * row, grad + r * dp, s.dim * sizeof(float));
    Gemm<false>(keys, dp, s.q_len, d_scores_t, qp, 1, qb, ldq, grad, dp);  // dK / s = dS^T Q
    for (int64_t r = 0; r < keys; ++r) {
      float* dst = d_k + k0 + (j0 + r) * row;
      for (int64_t d = 0; d < s.dim; ++d) dst[d] = grad[r * dp + d] * scale;
    }
    // dQ / s += dS K_block: dS read transposed out of dS^T.
    Gemm<true>(s.q_len, dp, keys, d_scores_t, 1, qp, kb + j0 * ldk, ldk, dq_acc, dp);
  }
  for (int64_t i = 0; i < s.q_len; ++i) {
    float* dst = d_q + q0 + i * row;
    for (int64_t d = 0; d < s.dim; ++d) dst[d] = dq_acc[i * dp + d] * scale;
  }
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_out,
                    ffi::ResultBuffer<ffi::F32> d_q, ffi::ResultBuffer<ffi::F32> d_k,
                    ffi::ResultBuffer<ffi::F32> d_v) {
  Shape s;
  if (ffi::Error error = GetShape(q, k, v, &s); error.failure()) return error;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *op = out.typed_data(), *lp = lse.typed_data(), *gp = d_out.typed_data();
  float *dq = d_q->typed_data(), *dk = d_k->typed_data(), *dv = d_v->typed_data();
  ParallelFor(pool, s.batch * s.heads, [&](int64_t item) {
    BackwardItem(s, item, qp, kp, vp, op, lp, gp, dq, dk, dv);
  });
  return ffi::Error::Success();
}

// The packed variants: q, k, v (and dq, dk, dv) are the parts of one [..., L, 3, H, D] array, as
// the model's qkv projection writes them; no slices going in, no concatenation coming out.
ffi::Error ForwardPacked(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                         ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  Shape s;
  if (ffi::Error error = GetPackedShape(qkv, &s); error.failure()) return error;
  const float* q = qkv.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  ParallelFor(pool, s.batch * s.heads, [&](int64_t item) {
    ForwardItem(s, item, q, q + s.out_row, q + 2 * s.out_row, op, lp);
  });
  return ffi::Error::Success();
}

ffi::Error BackwardPacked(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                          ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                          ffi::Buffer<ffi::F32> d_out, ffi::ResultBuffer<ffi::F32> d_qkv) {
  Shape s;
  if (ffi::Error error = GetPackedShape(qkv, &s); error.failure()) return error;
  const float *q = qkv.typed_data(), *op = out.typed_data(), *lp = lse.typed_data();
  const float* gp = d_out.typed_data();
  float* dq = d_qkv->typed_data();
  const int64_t part = s.out_row;  // k's and v's offsets within a token's row
  ParallelFor(pool, s.batch * s.heads, [&](int64_t item) {
    BackwardItem(s, item, q, q + part, q + 2 * part, op, lp, gp, dq, dq + part, dq + 2 * part);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupdiffFlashCpuForwardPacked, ForwardPacked,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv [..., L, 3, H, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [..., L, H, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse [..., H, L]
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupdiffFlashCpuBackwardPacked, BackwardPacked,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_qkv [..., L, 3, H, D]
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupdiffFlashCpuForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse [..., H, Lq]
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupdiffFlashCpuBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_q
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_k
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_v
);
