// Held-out retrieval metrics (see retrieval_eval.h).
#include "trainer/retrieval_eval.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <vector>

namespace vimo::trainer {
namespace {

// Note [Spreading the evaluation over ranks]
// Each rank encodes a contiguous chunk of ceil(n / world) of the n rows; the last rank's chunk is padded by
// repeating the final row so every rank gathers equal shapes, and the padding is cut off after the gather.
// Captions and videos are spread separately: a split has fewer videos than captions when a video has
// several (Note [Videos of a retrieval split] in data/retrieval_dataset.h).

// The embeddings of `records` (dataset indices), texts or videos, gathered from every rank in order.
models::GeminiEmbeddings encode_spread(models::GeminiMVR& model, const data::RetrievalDataset& split,
                                       const std::vector<int64_t>& records, bool texts,
                                       const std::shared_ptr<comm::Communicator>& comm, int64_t batch_size) {
  const auto n = static_cast<int64_t>(records.size());
  const int world = comm ? comm->size() : 1, rank = comm ? comm->rank() : 0;
  const int64_t chunk = (n + world - 1) / world;
  std::vector<int64_t> mine(chunk);
  for (int64_t i = 0; i < chunk; ++i) mine[i] = records[std::min<int64_t>(rank * chunk + i, n - 1)];

  std::vector<models::GeminiEmbeddings> parts;
  for (int64_t begin = 0; begin < chunk; begin += batch_size) {
    std::vector<int64_t> indices(mine.begin() + begin, mine.begin() + std::min(chunk, begin + batch_size));
    const data::RetrievalBatch batch = split.batch(indices);
    parts.push_back(texts ? model->encode_texts(batch.text_ids, batch.text_mask)
                          : model->encode_videos(batch.frames, batch.keypoints, batch.frame_mask));
  }
  // Concatenates one field over the local batches, gathers it from all ranks, drops the padding.
  auto assemble = [&](at::Tensor models::GeminiEmbeddings::*field) {
    if (!(parts.front().*field).defined()) return at::Tensor();
    std::vector<at::Tensor> pieces;
    for (const auto& p : parts) pieces.push_back(p.*field);
    at::Tensor local = at::cat(pieces, 0).contiguous();
    at::Tensor all = (comm && world > 1) ? comm->allgather(local) : local;
    return all.narrow(0, 0, n);
  };
  using E = models::GeminiEmbeddings;
  if (texts) return E{assemble(&E::text_action), assemble(&E::text_object), {}, {}, {}};
  return E{{}, {}, assemble(&E::video_action), assemble(&E::video_object), assemble(&E::router_weights)};
}

}  // namespace

std::string RetrievalMetrics::summary() const {
  return fmt::format(
      "R@1 {:.1f}% | R@5 {:.1f}% | R@10 {:.1f}% | MdR {:.1f} | MnR {:.2f} ({} captions, {} videos; "
      "chance R@1 {:.2f}%)",
      r1, r5, r10, median_rank, mean_rank, queries, videos,
      100.0 / static_cast<double>(std::max<int64_t>(videos, 1)));
}

std::string RetrievalMetrics::json() const {
  return fmt::format(
      "{{\"queries\": {}, \"videos\": {}, \"R@1\": {:.4f}, \"R@5\": {:.4f}, \"R@10\": {:.4f}, "
      "\"MdR\": {:.2f}, \"MnR\": {:.4f}}}",
      queries, videos, r1, r5, r10, median_rank, mean_rank);
}

RetrievalMetrics retrieval_metrics(const at::Tensor& scores, const at::Tensor& target_videos) {
  if (scores.dim() != 2 || scores.size(0) == 0 || scores.size(1) == 0) {
    throw std::runtime_error(fmt::format("retrieval scores must be [captions, videos], both > 0, found [{}]",
                                         fmt::join(scores.sizes(), ", ")));
  }
  const int64_t n = scores.size(0), videos = scores.size(1);
  if (!target_videos.defined() && n != videos) {
    throw std::runtime_error(fmt::format(
        "retrieval scores [{}, {}] without target videos must be square (the match on the diagonal)", n,
        videos));
  }
  const at::Tensor targets = target_videos.defined() ? target_videos.to(at::kLong) : at::arange(n, at::kLong);
  if (targets.dim() != 1 || targets.size(0) != n || targets.min().item<int64_t>() < 0 ||
      targets.max().item<int64_t>() >= videos) {
    throw std::runtime_error(fmt::format("retrieval target videos must be [{}] in [0, {}), found [{}]", n,
                                         videos, fmt::join(targets.sizes(), ", ")));
  }
  at::Tensor s = scores.to(at::kDouble);
  // NaN compares false, so `s > matched` would count nothing and a diverged model would rank every caption
  // first (R@1 100%): refuse, naming the first row.
  const at::Tensor finite_rows = at::isfinite(s).all(1);  // [N] bool
  if (!finite_rows.all().item<bool>()) {
    const int64_t row = (~finite_rows).nonzero()[0][0].item<int64_t>();
    const int64_t column = (~at::isfinite(s[row])).nonzero()[0][0].item<int64_t>();
    throw std::runtime_error(fmt::format(
        "retrieval scores: caption row {} of {} scores video {} as {}; no rank can be given. HINT: the model "
        "diverged (non-finite weights or activations): check the loss in metrics.jsonl, and lower "
        "optim.lr or set optim.grad_clip",
        row, n, column, s[row][column].item<double>()));
  }
  at::Tensor matched = s.gather(1, targets.unsqueeze(1));         // [N, 1]
  at::Tensor ranks = (s > matched).sum(1).to(at::kDouble) + 1.0;  // [N]
  RetrievalMetrics m;
  m.queries = n;
  m.videos = videos;
  auto within = [&](int k) { return 100.0 * (ranks <= k).to(at::kDouble).mean().item<double>(); };
  m.r1 = within(1);
  m.r5 = within(5);
  m.r10 = within(10);
  m.mean_rank = ranks.mean().item<double>();
  at::Tensor sorted = std::get<0>(ranks.sort());
  m.median_rank = n % 2 ? sorted[n / 2].item<double>()
                        : 0.5 * (sorted[n / 2 - 1].item<double>() + sorted[n / 2].item<double>());
  return m;
}

RetrievalMetrics evaluate_retrieval(models::GeminiMVR& model, const data::RetrievalDataset& split,
                                    const std::shared_ptr<comm::Communicator>& comm, int64_t batch_size) {
  at::NoGradGuard no_grad;
  // Every caption, and each distinct video once (through its first record): as CLIP4Clip's multi-sentence
  // evaluation, a caption ranks among videos, not among the other captions' copies of them.
  std::vector<int64_t> captions(static_cast<size_t>(split.size()));
  std::iota(captions.begin(), captions.end(), 0);
  const models::GeminiEmbeddings texts =
      encode_spread(model, split, captions, /*texts=*/true, comm, batch_size);
  const models::GeminiEmbeddings videos =
      encode_spread(model, split, split.video_records(), /*texts=*/false, comm, batch_size);
  return retrieval_metrics(model->score(texts, videos), split.record_videos());  // scores [N, V]
}

}  // namespace vimo::trainer
