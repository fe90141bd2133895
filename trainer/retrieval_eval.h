// Defines held-out text→video retrieval metrics (R@1, R@5, R@10, median and mean rank) and their
// evaluation over a dataset split with the encoding spread across DP ranks.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <string>

#include "comm/communicator.h"
#include "data/retrieval_dataset.h"
#include "models/gemini_mvr.h"

namespace vimo::trainer {

struct RetrievalMetrics {
  int64_t queries = 0;
  double r1 = 0, r5 = 0, r10 = 0;  // percent of captions whose video ranks within the top k
  double median_rank = 0, mean_rank = 0;
  std::string summary() const;  // "R@1 40.2% | R@5 ... | MnR 5.3 (256 captions; chance R@1 0.39%)"
  std::string json() const;
};

// scores [N, N]: caption i (row) against video j (column), the match on the diagonal. A video's rank is
// 1 + the number of videos scored strictly higher than the match.
RetrievalMetrics retrieval_metrics(const at::Tensor& scores);

// Encodes `split` (each rank a contiguous part, gathered to all) and scores every caption against every
// video with the model's current stage. Collective over `comm` (may be null).
RetrievalMetrics evaluate_retrieval(models::GeminiMVR& model, const data::RetrievalDataset& split,
                                    const std::shared_ptr<comm::Communicator>& comm,
                                    int64_t batch_size = 256);

}  // namespace vimo::trainer
