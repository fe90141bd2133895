// Internal to the fused symmetric InfoNCE (fused_contrastive.cpp, fused_contrastive_autograd.cpp): one
// direction's score matrix, what the two passes produce for it, and the passes themselves, defined in
// fused_contrastive.cpp (Note [Two-pass symmetric InfoNCE] there).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace vimo::kernels::detail {

// One score matrix S = rows · columnsᵀ (Note [Two-pass symmetric InfoNCE] in fused_contrastive.cpp), in the
// accumulation dtype.
struct ScoreMatrix {
  at::Tensor rows;     // R̃ [n, K], contiguous
  at::Tensor columns;  // C̃ [N, K], contiguous
  int64_t positive_offset = 0;
  bool column_softmax = false;  // one process: the columns are the other direction's rows
};

// What the two passes produce for one score matrix.
struct ScorePasses {
  at::Tensor row_lse;       // [n]
  at::Tensor column_lse;    // [N], with the column softmax only
  at::Tensor grad_rows;     // dL/dR̃ [n, K], when asked for
  at::Tensor grad_columns;  // dL/dC̃ [N, K], when asked for
};

// Both passes on the matrix's device; coefficient c = 1 / (2n) (dL_out is applied in backward). `tile`: rows
// per strip, or 0 to choose by device (Note [Strips on CUDA] in fused_contrastive.cpp). Only the gradient
// products asked for run (want_rows: dL/dR̃, want_columns: dL/dC̃).
ScorePasses run_score_passes(const ScoreMatrix& m, int64_t tile, double coefficient, bool want_rows,
                             bool want_columns);

}  // namespace vimo::kernels::detail
