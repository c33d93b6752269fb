// The three gradients of a dense layer y = x W + b in one XLA FFI custom call, X [M][K], dY [M][N]
// and W [K][N] row-major:
//   dX [M][K] = dY W^T,  dW [K][N] = X^T dY,  db [N] = column sums of dY.
//
// Why one call: XLA's CPU backend computes dW as a dot whose operand it first copies into a
// transposed layout and db as a separate reduce-window pass over dY; and when dW came from a
// kernel of its own, XLA ran its dX dot beside it, the two splitting the cores between them and
// running slower together (138-150 GFLOP/s on SiT-S/2's layers) than one after the other on all
// cores (~185-195). Here dX runs first, then dW and db, each over all of the pool's threads.
//
// Both products run through the micro-kernel shared with attention.cc (a 6-row tile of the
// output, 4 vectors wide):
// - dW: X read transposed in place (a row of X's 6-column slice broadcast against 4 vectors of
//   dY's row); db is summed from the dY rows while they are in cache. One work item is one strip
//   of 64 columns of dW over a block of up to kBlockRows of its rows; X's and dY's rows are taken
//   in chunks so the strip's dY panel and the block's X chunk stay in L2.
// - dX: W is first copied into panels of 64 of its rows, transposed, so each panel streams as
//   contiguous B rows. One work item is a block of kDxRows rows of dX, walking N in chunks of
//   kDxDepth so the block's dY chunk stays in L2 across all panels and each panel's chunk stays
//   in L2 across the block's tiles. The last K % 16 columns (none in SiT) are dot products.

#include "common.h"

namespace {

constexpr int64_t kChunkFloats = 131072;  // X's rows per pass are sized to this many floats
// dW's rows (X's columns) per work item. With all of a large K in one item (fc2's K = 1536), the
// item's dW strip and X's chunk crowded each other out of L2: 109-146 GFLOP/s against 171-176
// with blocks of 384 (two Zen 4 cores).
constexpr int64_t kBlockRows = 384;
constexpr int64_t kStrip = kVecs * kLanes;  // output columns per micro-kernel tile (64 on AVX-512)


// dW [K][N] = X^T dY and db [N], for items [0, strips * blocks) of a ParallelFor: one strip of
// kStrip columns of dW over one block of up to kBlockRows of its rows (db comes with the
// first block).
struct WeightGrad {
  const float *x, *d_y;
  float *d_w, *d_b;
  int64_t m, k, n, strips, block, chunk;

  WeightGrad(const float* x, const float* d_y, float* d_w, float* d_b, int64_t m, int64_t k,
             int64_t n)
      : x(x), d_y(d_y), d_w(d_w), d_b(d_b), m(m), k(k), n(n) {
    strips = (n + kStrip - 1) / kStrip;
    block = std::min<int64_t>(k, kBlockRows);
    // Rows per pass: the block's X chunk (chunk x block floats) ~512 KiB, in L2 beside dY's panel.
    chunk = std::clamp<int64_t>(kChunkFloats / block, 64, 256);
  }
  int64_t items() const { return strips * ((k + block - 1) / block); }

  void operator()(int64_t item) const {
    const int64_t strip = item % strips, i0 = item / strips * block;
    const int64_t i1 = std::min<int64_t>(k, i0 + block);
    const int64_t j0 = strip * kStrip;
    const int vecs = static_cast<int>(std::min<int64_t>(kVecs, (n - j0) / kLanes));
    Vec bias[kVecs] = {};
    for (int64_t m0 = 0; m0 < m; m0 += chunk) {
      const int64_t rows = std::min<int64_t>(chunk, m - m0);
      const float* panel = d_y + m0 * n + j0;
      if (i0 == 0)
        for (int64_t r = 0; r < rows; ++r)
          for (int v = 0; v < vecs; ++v) bias[v] += Load(panel + r * n + v * kLanes);
      const auto& kernels = m0 ? kAdd : kSet;  // the first chunk writes dW, the rest add to it
      for (int64_t i = i0; i < i1; i += kRows) {
        const int tile = static_cast<int>(std::min<int64_t>(kRows, i1 - i));
        // A[r][t] = X[m0 + t][i + r]: X read transposed, straight from its rows.
        kernels[(tile - 1) * kVecs + (vecs - 1)](rows, x + m0 * k + i, 1, k, panel, n,
                                                 d_w + i * n + j0, n);
      }
    }
    if (i0 == 0)
      for (int v = 0; v < vecs; ++v) Store(d_b + j0 + v * kLanes, bias[v]);
  }
};

// dX [M][K] = dY [M][N] W^T, for items [0, ceil(M / kDxRows)) of a ParallelFor, after Pack has
// copied W into `panels` panels of kStrip of its rows, transposed (panel p holds
// W[p * kStrip + c][j] at [j][c]).
constexpr int64_t kDxRows = 96;
constexpr int64_t kDxDepth = 384;

struct InputGrad {
  const float *d_y, *w;
  float *packed, *d_x;
  int64_t m, k, n, panels;

  int64_t items() const { return (m + kDxRows - 1) / kDxRows; }

  void Pack(int64_t panel) const {  // W[c0 .. c0 + kStrip)[0 .. n) -> packed[panel][j][c]
    const int64_t c0 = panel * kStrip, cols = std::min<int64_t>(kStrip, k - c0);
    float* out = packed + panel * n * kStrip;
    for (int64_t j0 = 0; j0 < n; j0 += kLanes)
      for (int64_t c = 0; c < cols; ++c)
        for (int64_t j = j0; j < std::min<int64_t>(n, j0 + kLanes); ++j)
          out[j * kStrip + c] = w[(c0 + c) * n + j];
  }

  void operator()(int64_t item) const {
    const int64_t r0 = item * kDxRows, r1 = std::min<int64_t>(m, r0 + kDxRows);
    for (int64_t d0 = 0; d0 < n; d0 += kDxDepth) {
      const int64_t depth = std::min<int64_t>(kDxDepth, n - d0);
      const auto& kernels = d0 ? kAdd : kSet;
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t c0 = p * kStrip;
        const int vecs = static_cast<int>(std::min<int64_t>(kVecs, (k - c0) / kLanes));
        if (vecs == 0) break;  // only the last few columns are left: Tail's
        const float* b = packed + p * n * kStrip + d0 * kStrip;
        for (int64_t i = r0; i < r1; i += kRows) {
          const int tile = static_cast<int>(std::min<int64_t>(kRows, r1 - i));
          kernels[(tile - 1) * kVecs + (vecs - 1)](depth, d_y + i * n + d0, n, 1, b, kStrip,
                                                   d_x + i * k + c0, k);
        }
      }
    }
    Tail(r0, r1);
  }

  // The last K % kLanes columns of dX, as dot products of dY's rows with W's rows.
  void Tail(int64_t r0, int64_t r1) const {
    for (int64_t c = k / kLanes * kLanes; c < k; ++c)
      for (int64_t i = r0; i < r1; ++i) {
        Vec sum{};
        for (int64_t j = 0; j < n; j += kLanes) sum += Load(d_y + i * n + j) * Load(w + c * n + j);
        float total = 0.0f;
        for (int l = 0; l < kLanes; ++l) total += sum[l];
        d_x[i * k + c] = total;
      }
  }
};

ffi::Error DenseBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::F32> d_y, ffi::Buffer<ffi::F32> w,
                         ffi::ResultBuffer<ffi::F32> d_x, ffi::ResultBuffer<ffi::F32> d_w,
                         ffi::ResultBuffer<ffi::F32> d_b) {
  auto xd = x.dimensions(), yd = d_y.dimensions(), wd = w.dimensions();
  if (xd.size() == 0 || yd.size() == 0 || wd.size() != 2)
    return ffi::Error::InvalidArgument("dense backward: x and d_y need a feature axis, w two axes");
  const int64_t k = xd.back(), n = yd.back();
  const int64_t m = k ? static_cast<int64_t>(x.element_count()) / k : 0;
  if (wd[0] != k || wd[1] != n || n % kLanes || m * n != static_cast<int64_t>(d_y.element_count()))
    return ffi::Error::InvalidArgument("dense backward: x [M, K], d_y [M, N] and w [K, N] "
                                       "disagree, or N is not a multiple of the vector width");
  float *wp = d_w->typed_data(), *bp = d_b->typed_data();
  if (m == 0) {  // no rows: zero weight and bias gradients (dX is empty)
    std::fill(wp, wp + k * n, 0.0f);
    std::fill(bp, bp + n, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t panels = (k + kStrip - 1) / kStrip;
  // The calling thread's scratch, read by the pool's threads during this call; none of this
  // call's items take scratch of their own.
  float* packed = Scratch(panels * n * kStrip);
  InputGrad input{d_y.typed_data(), w.typed_data(), packed, d_x->typed_data(), m, k, n, panels};
  ParallelFor(pool, panels, [&](int64_t p) { input.Pack(p); });
  ParallelFor(pool, input.items(), input);  // dX first: the rest of the backward pass waits on it
  WeightGrad grad(x.typed_data(), d_y.typed_data(), wp, bp, m, k, n);
  ParallelFor(pool, grad.items(), grad);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupdiffDenseBackward, DenseBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [..., K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_y [..., N]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [K, N]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_x [..., K]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_w [K, N]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // d_b [N]
);
