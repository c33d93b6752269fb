// The weight and bias gradients of a dense layer y = x W + b in one pass, as an XLA FFI custom call:
//   dW [K][N] = X^T dY,  db [N] = column sums of dY,  X [M][K] and dY [M][N] row-major.
//
// Why: XLA's CPU backend computes dW as a dot whose operand it first copies into a transposed
// layout (a fused layer norm or GELU recomputation written column by column) and db as a
// separate reduce-window pass over dY; on SiT-S/2's train step those copies and passes cost more
// than the dots themselves. Here X and dY are read once, in place: a row of X's 6-column slice
// is broadcast against 4 vectors of dY's row (the same micro-kernel as attention.cc, with A read
// transposed), and db is summed from the dY rows while they are in cache.
//
// One work item is one strip of kVecs * kLanes columns of dW over a block of up to kBlockRows of
// its rows (db comes with the first block); the rows of X and dY are taken in chunks so the
// strip's dY panel and the block's X chunk stay in L2 while every 6-row tile of dW uses them.

#include "common.h"

namespace {

constexpr int64_t kChunkFloats = 131072;  // X's rows per pass are sized to this many floats
// dW's rows (X's columns) per work item. With all of a large K in one item (fc2's K = 1536), the
// item's dW strip and X's chunk crowded each other out of L2: 109-146 GFLOP/s against 171-176
// with blocks of 384 (two Zen 4 cores).
constexpr int64_t kBlockRows = 384;


ffi::Error DenseGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> d_y,
                     ffi::ResultBuffer<ffi::F32> d_w, ffi::ResultBuffer<ffi::F32> d_b) {
  auto xd = x.dimensions(), yd = d_y.dimensions();
  if (xd.size() == 0 || yd.size() == 0)
    return ffi::Error::InvalidArgument("dense_grad: x and d_y need a feature axis");
  const int64_t k = xd.back(), n = yd.back();
  const int64_t m = k ? static_cast<int64_t>(x.element_count()) / k : 0;
  if (n % kLanes || m * n != static_cast<int64_t>(d_y.element_count()))
    return ffi::Error::InvalidArgument("dense_grad: x [M, K] and d_y [M, N] disagree, or N is "
                                       "not a multiple of the vector width");
  const float *xp = x.typed_data(), *yp = d_y.typed_data();
  float *wp = d_w->typed_data(), *bp = d_b->typed_data();
  constexpr int64_t kStrip = kVecs * kLanes;
  if (m == 0) {  // no rows: zero gradients
    std::fill(wp, wp + k * n, 0.0f);
    std::fill(bp, bp + n, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t strips = (n + kStrip - 1) / kStrip;
  const int64_t block = std::min<int64_t>(k, kBlockRows);
  const int64_t blocks = (k + block - 1) / block;
  // Rows per pass: the block's X chunk (chunk x block floats) ~512 KiB, in L2 beside dY's panel.
  const int64_t chunk = std::clamp<int64_t>(kChunkFloats / block, 64, 256);
  ParallelFor(pool, strips * blocks, [&](int64_t item) {
    const int64_t strip = item % strips, i0 = item / strips * block;
    const int64_t i1 = std::min<int64_t>(k, i0 + block);
    const int64_t j0 = strip * kStrip;
    const int vecs = static_cast<int>(std::min<int64_t>(kVecs, (n - j0) / kLanes));
    Vec bias[kVecs] = {};
    for (int64_t m0 = 0; m0 < m; m0 += chunk) {
      const int64_t rows = std::min<int64_t>(chunk, m - m0);
      const float* panel = yp + m0 * n + j0;
      if (i0 == 0)
        for (int64_t r = 0; r < rows; ++r)
          for (int v = 0; v < vecs; ++v) bias[v] += Load(panel + r * n + v * kLanes);
      const auto& kernels = m0 ? kAdd : kSet;  // the first chunk writes dW, the rest add to it
      for (int64_t i = i0; i < i1; i += kRows) {
        const int tile = static_cast<int>(std::min<int64_t>(kRows, i1 - i));
        // A[r][t] = X[m0 + t][i + r]: X read transposed, straight from its rows.
        kernels[(tile - 1) * kVecs + (vecs - 1)](rows, xp + m0 * k + i, 1, k, panel, n,
                                                 wp + i * n + j0, n);
      }
    }
    if (i0 == 0)
      for (int v = 0; v < vecs; ++v) Store(bp + j0 + v * kLanes, bias[v]);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupdiffDenseGrad, DenseGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [..., K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_y [..., N]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_w [K, N]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_b [N]
);
