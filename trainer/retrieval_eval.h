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
  int64_t queries = 0;             // captions
  int64_t videos = 0;              // distinct videos each caption is ranked among
  double r1 = 0, r5 = 0, r10 = 0;  // percent of captions whose video ranks within the top k
  double median_rank = 0, mean_rank = 0;
  // "R@1 40.2% | R@5 ... | MnR 5.3 (512 captions, 256 videos; chance R@1 0.39%)"
  std::string summary() const;
  std::string json() const;
};

// scores [N, V]: caption i (row) against video j (column); caption i's video is column target_videos[i]
// ([N] int64; undefined: the diagonal of a square matrix, one video per caption). A caption's rank is 1 + the
// number of videos scored strictly higher than its own. A non-finite score is an error naming its row: the
// model diverged, and NaN compares false, so it would rank first.
RetrievalMetrics retrieval_metrics(const at::Tensor& scores, const at::Tensor& target_videos = {});

// Encodes `split`'s captions and its distinct videos (Note [Videos of a retrieval split] in
// data/retrieval_dataset.h; each rank a contiguous part, gathered to all) and ranks every caption among the
// videos with the model's current stage. Collective over `comm` (may be null).
RetrievalMetrics evaluate_retrieval(models::GeminiMVR& model, const data::RetrievalDataset& split,
                                    const std::shared_ptr<comm::Communicator>& comm,
                                    int64_t batch_size = 256);

}  // namespace vimo::trainer
