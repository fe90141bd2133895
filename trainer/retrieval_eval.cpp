// Held-out retrieval metrics (see retrieval_eval.h).
#include "trainer/retrieval_eval.h"

#include <fmt/format.h>

#include <algorithm>
#include <numeric>

namespace vimo::trainer {

std::string RetrievalMetrics::summary() const {
  return fmt::format(
      "R@1 {:.1f}% | R@5 {:.1f}% | R@10 {:.1f}% | MdR {:.1f} | MnR {:.2f} ({} captions; chance R@1 {:.2f}%)",
      r1, r5, r10, median_rank, mean_rank, queries,
      100.0 / static_cast<double>(std::max<int64_t>(queries, 1)));
}

std::string RetrievalMetrics::json() const {
  return fmt::format(
      "{{\"queries\": {}, \"R@1\": {:.4f}, \"R@5\": {:.4f}, \"R@10\": {:.4f}, \"MdR\": {:.2f}, \"MnR\": "
      "{:.4f}}}",
      queries, r1, r5, r10, median_rank, mean_rank);
}

RetrievalMetrics retrieval_metrics(const at::Tensor& scores) {
  TORCH_CHECK(scores.dim() == 2 && scores.size(0) == scores.size(1),
              "retrieval scores must be square [N, N]");
  at::Tensor s = scores.to(at::kDouble);
  at::Tensor matched = s.diagonal().unsqueeze(1);                 // [N, 1]
  at::Tensor ranks = (s > matched).sum(1).to(at::kDouble) + 1.0;  // [N]
  RetrievalMetrics m;
  m.queries = scores.size(0);
  auto within = [&](int k) { return 100.0 * (ranks <= k).to(at::kDouble).mean().item<double>(); };
  m.r1 = within(1);
  m.r5 = within(5);
  m.r10 = within(10);
  m.mean_rank = ranks.mean().item<double>();
  at::Tensor sorted = std::get<0>(ranks.sort());
  const int64_t n = m.queries;
  m.median_rank = n % 2 ? sorted[n / 2].item<double>()
                        : 0.5 * (sorted[n / 2 - 1].item<double>() + sorted[n / 2].item<double>());
  return m;
}

RetrievalMetrics evaluate_retrieval(models::GeminiMVR& model, const data::RetrievalDataset& split,
                                    const std::shared_ptr<comm::Communicator>& comm, int64_t batch_size) {
  at::NoGradGuard no_grad;
  const int64_t n = split.size();
  const int world = comm ? comm->size() : 1, rank = comm ? comm->rank() : 0;
  // Each rank encodes `chunk` samples; the last rank's chunk is padded by repeating the final sample so
  // every rank gathers equal shapes; the padding is cut off after the gather.
  const int64_t chunk = (n + world - 1) / world;
  std::vector<int64_t> mine(chunk);
  for (int64_t i = 0; i < chunk; ++i) mine[i] = std::min<int64_t>(rank * chunk + i, n - 1);

  std::vector<models::GeminiEmbeddings> texts, videos;
  for (int64_t begin = 0; begin < chunk; begin += batch_size) {
    std::vector<int64_t> indices(mine.begin() + begin, mine.begin() + std::min(chunk, begin + batch_size));
    const data::RetrievalBatch batch = split.batch(indices);
    texts.push_back(model->encode_texts(batch.text_ids, batch.text_mask));
    videos.push_back(model->encode_videos(batch.frames, batch.keypoints, batch.frame_mask));
  }
  // Concatenates one field over the local batches, gathers it from all ranks, drops the padding.
  auto assemble = [&](const std::vector<models::GeminiEmbeddings>& parts,
                      at::Tensor models::GeminiEmbeddings::*field) {
    if (!(parts.front().*field).defined()) return at::Tensor();
    std::vector<at::Tensor> pieces;
    for (const auto& p : parts) pieces.push_back(p.*field);
    at::Tensor local = at::cat(pieces, 0).contiguous();
    at::Tensor all = (comm && world > 1) ? comm->allgather(local) : local;
    return all.narrow(0, 0, n);
  };
  using E = models::GeminiEmbeddings;
  E all_texts{assemble(texts, &E::text_action), assemble(texts, &E::text_object), {}, {}, {}};
  E all_videos{{},
               {},
               assemble(videos, &E::video_action),
               assemble(videos, &E::video_object),
               assemble(videos, &E::router_weights)};
  return retrieval_metrics(model->score(all_texts, all_videos));
}

}  // namespace vimo::trainer
