// The Gemini-MVR training loop (see retriever_trainer.h). Reads like a table of contents: build the
// parts, restore state, then step / log / check / save / evaluate.
#include "trainer/retriever_trainer.h"

#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/utils.h>
#include <yaml-cpp/yaml.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>
#include <vector>

#include "checkpoints/checkpoint.h"
#include "checkpoints/sharded_state.h"
#include "comm/gradient_reducer.h"
#include "data/loader.h"
#include "data/manifest.h"
#include "data/retrieval_dataset.h"
#include "models/gemini_mvr.h"
#include "trainer/data_parallel.h"
#include "trainer/job_watch.h"
#include "trainer/metrics.h"
#include "trainer/optimizer.h"
#include "trainer/preemption.h"
#include "trainer/zero_optimizer.h"

namespace vimo::trainer {
namespace fs = std::filesystem;
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

bool is_main(const std::shared_ptr<comm::Communicator>& comm) { return !comm || comm->rank() == 0; }

void say(const std::shared_ptr<comm::Communicator>& comm, const std::string& line) {
  if (!is_main(comm)) return;
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

// The model's shapes must fit the dataset it reads (its shapes are those of the test split's records).
void check_dataset_fits(const models::GeminiConfig& m, const data::RetrievalDataset& d,
                        const std::string& dir) {
  auto fail = [&](const std::string& what) {
    throw std::runtime_error("dataset " + dir + " does not fit the model config: " + what +
                             ". HINT: set the model.* keys to the dataset's sizes (see its manifest.json)");
  };
  if (d.vocab_size() > m.vocab_size)
    fail(fmt::format("vocab.txt has {} tokens > model.vocab_size {}", d.vocab_size(), m.vocab_size));
  if (d.max_text_len() > m.max_text_len)
    fail(fmt::format("captions have {} tokens > model.max_text_len {}", d.max_text_len(), m.max_text_len));
  if (d.frames() > m.frames)
    fail(fmt::format("videos have {} frames > model.frames {}", d.frames(), m.frames));
  if (m.joints != data::kKeypointJoints)
    fail(fmt::format("keypoints have {} joints, model.joints is {}", data::kKeypointJoints, m.joints));
  if (d.feature_dim() != m.feature_dim)
    fail(fmt::format("frame features have {} dims, model.feature_dim is {}", d.feature_dim(), m.feature_dim));
}

checkpoints::TensorFile model_tensors(models::GeminiMVR& model) {
  checkpoints::TensorFile file;
  for (const auto& item : model->named_parameters())
    file.tensors["model." + item.key()] = item.value().detach();
  return file;
}

void load_model_tensors(models::GeminiMVR& model, const checkpoints::TensorFile& file,
                        const std::string& source) {
  at::NoGradGuard no_grad;
  for (auto& item : model->named_parameters()) {
    auto it = file.tensors.find("model." + item.key());
    if (it == file.tensors.end())
      throw std::runtime_error(source + ": parameter 'model." + item.key() + "' is missing");
    if (!it->second.sizes().equals(item.value().sizes())) {
      throw std::runtime_error(
          fmt::format("{}: parameter 'model.{}' has shape {}, the model config gives {}. HINT: "
                      "use the model.* keys of the run that wrote it",
                      source, item.key(), c10::str(it->second.sizes()), c10::str(item.value().sizes())));
    }
    item.value().copy_(it->second);
  }
}

// A run directory (its checkpoints/ inside) or a checkpoint directory → the newest valid checkpoint.
std::string resolve_checkpoint(const std::string& path) {
  if (fs::exists(fs::path(path) / "manifest.json")) return path;
  for (const std::string& root : {path + "/checkpoints", path}) {
    if (auto found = checkpoints::CheckpointManager::latest_valid(root)) return *found;
  }
  throw std::runtime_error(
      "no valid checkpoint in '" + path +
      "'. HINT: train.init_from names the out_dir of the "
      "previous stage's run (or one of its checkpoints/step_* directories); run that stage first");
}

// The run's optimizer: AdamW with its whole moments on every rank, the gradients averaged during backward by
// the GradientReducer (optim.zero_stage 0), or ZeroAdamW, which averages them in its step and keeps 1/DP of
// the moments per rank (1). AdamW's moments go into rank 0's checkpoint file whole; ZeroAdamW's go in pieces
// into each rank's own file (Note [Every rank writes its own part] in checkpoints/checkpoint.h), under the
// same names, so a checkpoint resumes with either, on any DP size.
class RunOptimizer {
 public:
  RunOptimizer(const std::vector<std::pair<std::string, at::Tensor>>& parameters, const OptimConfig& o,
               const std::shared_ptr<comm::Communicator>& comm) {
    const AdamWOptions options{o.beta1, o.beta2, o.eps, o.weight_decay};
    if (o.zero_stage == 1 && comm) {
      sharded_ = std::make_unique<ZeroAdamW>(parameters, comm, options);
    } else {
      replicated_ = std::make_unique<AdamW>(parameters, options);
    }
  }
  bool sharded() const { return sharded_ != nullptr; }

  // Clips to `max_norm` (0: no clipping) and updates; returns the gradient norm before clipping. Collective
  // when sharded.
  double step(const std::vector<at::Tensor>& trainable, double lr, double max_norm) {
    if (sharded_) return sharded_->step(lr, max_norm);
    const double norm = clip_gradients(trainable, max_norm);
    replicated_->step(lr);
    return norm;
  }
  void zero_grad() { sharded_ ? sharded_->zero_grad() : replicated_->zero_grad(); }
  int64_t steps_taken() const { return sharded_ ? sharded_->steps_taken() : replicated_->steps_taken(); }
  // Bytes of the moments this rank holds.
  int64_t state_bytes() const {
    if (sharded_) return sharded_->state_bytes();
    int64_t bytes = 0;
    for (const auto& [name, t] : replicated_->state_tensors()) bytes += t.numel() * t.element_size();
    return bytes;
  }
  // AdamW's whole moments, for rank 0's file (replicated), or nothing.
  std::map<std::string, at::Tensor> replicated_state() const {
    return sharded_ ? std::map<std::string, at::Tensor>{} : replicated_->state_tensors();
  }
  // ZeroAdamW's part of the moments on this rank, for its own file (sharded), or nothing.
  std::optional<checkpoints::TensorFile> own_state() const {
    if (!sharded_) return std::nullopt;
    checkpoints::TensorFile own;
    checkpoints::add_pieces(own, sharded_->state_pieces());
    return own;
  }
  void load_checkpoint(const checkpoints::StateReader& reader, int64_t steps_taken) {
    if (sharded_) {
      sharded_->load_state(reader, steps_taken);
      return;
    }
    std::map<std::string, at::Tensor> whole;
    for (const auto& [key, moment] : replicated_->state_tensors()) {
      if (!reader.contains(key))
        throw std::runtime_error("optimizer state '" + key + "' is missing from the checkpoint");
      whole[key] = reader.read_whole(key);  // AdamW checks its shape
    }
    replicated_->load_state_tensors(whole, steps_taken);
  }

 private:
  std::unique_ptr<AdamW> replicated_;
  std::unique_ptr<ZeroAdamW> sharded_;
};

// Starts the checkpoint of `step`: model and AdamW moments in rank 0's safetensors file (ZeRO-1's moments in
// every rank's own), the sampler state, the resolved config, written in the background from a snapshot (Note
// [Saving in the background] in checkpoints/checkpoint.cpp). Collective.
std::string save_training_state(checkpoints::CheckpointManager& checkpoints, int64_t step,
                                const std::string& stage, models::GeminiMVR& model,
                                const RunOptimizer& optimizer, const data::StreamingLoader& loader,
                                const std::string& config_yaml) {
  checkpoints::TensorFile state = model_tensors(model);
  for (auto& [name, tensor] : optimizer.replicated_state()) state.tensors[name] = tensor;
  state.metadata = {{"step", std::to_string(step)},
                    {"stage", stage},
                    {"optimizer_steps", std::to_string(optimizer.steps_taken())}};
  const std::optional<checkpoints::TensorFile> own = optimizer.own_state();
  return checkpoints.save_async(step, state,
                                data::sampler_state_json(loader.state(), loader.order_fingerprint()),
                                config_yaml, own ? &*own : nullptr);
}

// The keys of `section` whose values differ between two resolved configs (to_yaml's), as "model.heads: 4 in
// the checkpoint, 2 now".
std::vector<std::string> section_differences(const std::string& saved_yaml, const std::string& current_yaml,
                                             const std::string& section) {
  const YAML::Node saved = YAML::Load(saved_yaml)[section], current = YAML::Load(current_yaml)[section];
  std::map<std::string, std::pair<std::string, std::string>> values;  // key -> (saved, current)
  const auto text = [](const YAML::Node& node) { return YAML::Dump(node); };
  for (const auto& entry : saved) values[entry.first.as<std::string>()].first = text(entry.second);
  for (const auto& entry : current) values[entry.first.as<std::string>()].second = text(entry.second);
  std::vector<std::string> differences;
  for (const auto& [key, pair] : values) {
    if (pair.first == pair.second) continue;
    differences.push_back(fmt::format("{}.{}: {} in the checkpoint, {} now", section, key,
                                      pair.first.empty() ? "(absent)" : pair.first,
                                      pair.second.empty() ? "(absent)" : pair.second));
  }
  return differences;
}

// Restores model, AdamW moments and sampler position from `directory`; returns its step. `config_yaml` is
// this run's resolved config, whose model.* keys must be the checkpoint's.
int64_t restore_training_state(const std::string& directory, const std::string& stage,
                               const std::string& config_yaml, models::GeminiMVR& model,
                               RunOptimizer& optimizer, data::StreamingLoader& loader,
                               const std::shared_ptr<comm::Communicator>& comm) {
  // agreed_latest_valid() checksummed every file on rank 0 (Note [One checkpoint for every rank]).
  const checkpoints::Checkpoint ckpt =
      checkpoints::CheckpointManager::load(directory, checkpoints::Checksums::kShared);
  // A resumed run must build the model it saved: shapes are checked when the tensors load, but not the rest
  // (a scale, a clamp), which would change the run silently.
  if (const std::vector<std::string> differences =
          section_differences(ckpt.config_yaml, config_yaml, "model");
      !differences.empty()) {
    throw std::runtime_error(
        fmt::format("{}/config.yaml: the checkpoint was trained with another model: {}. HINT: --resume "
                    "continues the same "
                    "run; use train.init_from to start a new one from its weights",
                    directory, fmt::join(differences, "; ")));
  }
  const std::string saved_stage = ckpt.state.metadata.count("stage") ? ckpt.state.metadata.at("stage") : "?";
  if (saved_stage != stage) {
    throw std::runtime_error(
        fmt::format("{} was saved by stage '{}' but train.stage is '{}'. HINT: --resume "
                    "continues the same stage; use train.init_from to start the next one",
                    directory, saved_stage, stage));
  }
  // Other optimizer settings may change on purpose (a lower lr after a spike), but never unseen.
  if (const std::vector<std::string> differences =
          section_differences(ckpt.config_yaml, config_yaml, "optim");
      !differences.empty()) {
    say(comm, fmt::format("note: resuming with other optimizer settings than {} was saved with ({}); the new "
                          "values apply from here",
                          directory, fmt::join(differences, "; ")));
  }
  load_model_tensors(model, ckpt.state, directory);
  const std::string state_file = directory + "/rank_00000.safetensors";
  const auto steps_text = ckpt.state.metadata.find("optimizer_steps");
  int64_t optimizer_steps = -1;
  if (steps_text != ckpt.state.metadata.end()) {
    try {
      size_t used = 0;
      optimizer_steps = std::stoll(steps_text->second, &used);
      if (used != steps_text->second.size()) optimizer_steps = -1;
    } catch (const std::exception&) {
      optimizer_steps = -1;
    }
  }
  if (optimizer_steps < 0) {
    throw std::runtime_error(
        fmt::format("{}: the metadata key 'optimizer_steps' is missing or not a count "
                    "(found '{}')",
                    state_file, steps_text == ckpt.state.metadata.end() ? "" : steps_text->second));
  }
  optimizer.load_checkpoint(checkpoints::StateReader(ckpt), optimizer_steps);
  std::string order;
  const data::SamplerState sampler =
      data::parse_sampler_state_json(ckpt.loader_json, directory + "/loader.json", &order);
  if (!order.empty() && order != loader.order_fingerprint()) {
    throw std::runtime_error(
        fmt::format("{}: the training split's shards or data.shuffle_block differ from the run that saved "
                    "this checkpoint "
                    "(sample order {} there, {} now); resuming would read other batches. HINT: resume on the "
                    "same dataset "
                    "(`vimo data verify` it) and the same data.* settings",
                    directory, order, loader.order_fingerprint()));
  }
  loader.load_state(sampler);
  return ckpt.step;
}

// This rank's training batch. With skip_corrupt, ranks may have lost different numbers of records; the
// gathered contrastive loss needs equal local batches, so every rank keeps the smallest rank's count (the
// records dropped that way are valid but unread this step). `skipped` returns the records skipped as corrupt
// on all ranks.
data::RetrievalBatch agree_on_batch(const data::LoaderBatch& loaded, const data::RetrievalDims& dims,
                                    const std::shared_ptr<comm::Communicator>& comm, bool skip_corrupt,
                                    int64_t& skipped) {
  data::RetrievalBatch batch = data::to_retrieval_batch(
      loaded.tensors, dims, fmt::format("training batch {} of epoch {}", loaded.step, loaded.epoch));
  skipped = loaded.corrupt_skipped;
  if (!skip_corrupt || !comm || comm->size() == 1) {
    if (batch.size() == 0) {
      throw std::runtime_error(fmt::format(
          "every record of training batch {} of epoch {} was corrupt; stopping", loaded.step, loaded.epoch));
    }
    return batch;
  }
  at::Tensor counts = at::tensor({batch.size(), -batch.size(), loaded.corrupt_skipped}, at::kLong);
  comm->allreduce(counts, comm::ReduceOp::Max);  // [max size, -min size, max skipped]
  at::Tensor total = at::tensor({loaded.corrupt_skipped}, at::kLong);
  comm->allreduce(total, comm::ReduceOp::Sum);
  skipped = total.item<int64_t>();
  const int64_t keep = -counts[1].item<int64_t>();
  if (keep == 0) throw std::runtime_error("every record of a rank's batch was corrupt; stopping");
  if (keep < batch.size()) {
    batch.sample_ids = batch.sample_ids.narrow(0, 0, keep);
    batch.text_ids = batch.text_ids.narrow(0, 0, keep);
    batch.text_mask = batch.text_mask.narrow(0, 0, keep);
    batch.frames = batch.frames.narrow(0, 0, keep);
    batch.keypoints = batch.keypoints.narrow(0, 0, keep);
    batch.frame_mask = batch.frame_mask.narrow(0, 0, keep);
  }
  return batch;
}

int64_t count_elements(const std::vector<at::Tensor>& tensors) {
  int64_t n = 0;
  for (const at::Tensor& t : tensors) n += t.numel();
  return n;
}

}  // namespace

TrainResult train_retriever(const Config& config, bool resume,
                            const std::shared_ptr<comm::Communicator>& comm,
                            const PreemptionSignals* preemption_signals) {
  const TrainConfig& t = config.train;
  const int world = comm ? comm->size() : 1, rank = comm ? comm->rank() : 0;
  if (config.data.global_batch % world != 0) {
    throw std::runtime_error(
        fmt::format("data.global_batch {} is not divisible by the {} DP ranks. HINT: pick a "
                    "multiple of the rank count",
                    config.data.global_batch, world));
  }
  at::set_num_threads(static_cast<int>(t.threads));
  // SIGTERM / SIGUSR1 stop the run at a step boundary, with a checkpoint (Note [Preemption at a step
  // boundary] in trainer/preemption.h).
  std::optional<PreemptionSignals> own_signals;
  if (!preemption_signals) preemption_signals = &own_signals.emplace();
  const PreemptionSignals& preemption = *preemption_signals;
  // A dead, stopped or stuck rank ends the job with a message naming it, instead of a hang.
  std::unique_ptr<JobWatch> watch;
  if (comm && world > 1 && t.watchdog_timeout_s > 0) {
    watch = std::make_unique<JobWatch>(comm, t.watchdog_timeout_s, t.heartbeat_s);
  }

  // Data: the train split streams from its shards (each rank reads only its samples); the small test split
  // is held in memory for evaluation, and its records fix the shapes every training batch is checked against.
  const data::RetrievalDataset test_set(config.data.dir, "test");
  check_dataset_fits(config.model, test_set, config.data.dir);
  data::LoaderOptions loader_options;
  loader_options.dir = config.data.dir;
  loader_options.split = "train";
  loader_options.kind = data::kRetrievalKind;
  loader_options.global_batch = config.data.global_batch;
  loader_options.dp_rank = rank;
  loader_options.dp_size = world;
  loader_options.seed = config.data.seed;
  loader_options.shuffle_block = config.data.shuffle_block;
  loader_options.workers = static_cast<int>(config.data.workers);
  loader_options.prefetch = static_cast<int>(config.data.prefetch);
  loader_options.skip_corrupt = config.data.skip_corrupt;
  // Each record is checked against the test split's shapes as it is read: a bad one is named, or skipped.
  loader_options.schema = data::retrieval_schema(test_set.dims(), "the test split's first record");
  loader_options.verify =
      config.data.verify == "first_read" ? data::Verification::FirstRead : data::Verification::EveryRead;
  loader_options.drop_last = config.data.drop_last;
  loader_options.open_shards = static_cast<size_t>(config.data.open_shards);
  data::StreamingLoader loader(loader_options);

  // Model: same seed on every rank, and rank 0's values broadcast so replicas start identical.
  torch::manual_seed(t.seed);
  models::GeminiMVR model(config.model);
  broadcast_parameters(model, comm);
  model->set_stage(models::parse_stage(t.stage));
  std::vector<at::Tensor> trainable;
  for (const auto& [name, p] : model->trainable_parameters()) trainable.push_back(p);
  RunOptimizer optimizer(model->trainable_parameters(), config.optim, comm);
  checkpoints::CheckpointManager checkpoints(t.out_dir + "/checkpoints", t.keep_checkpoints, comm);
  const std::string config_yaml = to_yaml(config);

  int64_t start_step = 0;
  const std::optional<std::string> existing =
      checkpoints::CheckpointManager::agreed_latest_valid(checkpoints.root(), comm);
  if (!resume && existing) {
    // A fresh run beside another run's checkpoints would mix with them, and a later --resume would pick up
    // whichever is newest, the other run's included.
    throw std::runtime_error(
        fmt::format("train.out_dir {} already holds checkpoints (the newest: {}). HINT: add --resume to "
                    "continue that run, "
                    "or give this one another train.out_dir (or delete {})",
                    t.out_dir, *existing, checkpoints.root()));
  }
  std::optional<std::string> resume_from = resume ? existing : std::nullopt;
  if (resume && !resume_from) {
    say(comm, "--resume: no valid checkpoint under " + checkpoints.root() + ", starting fresh");
  }
  if (resume_from) {
    start_step = restore_training_state(*resume_from, t.stage, config_yaml, model, optimizer, loader, comm);
    say(comm, fmt::format("resumed from {} (step {}, now on {} ranks)", *resume_from, start_step, world));
  } else if (!t.init_from.empty()) {
    const std::string source = resolve_checkpoint(t.init_from);
    load_model_tensors(model, checkpoints::CheckpointManager::load(source).state, source);
    say(comm, "initialized model weights from " + source);
  }
  model->clamp_logit_scale();  // weights from a run with a higher bound (a no-op otherwise)

  // The resolved config beside the run's outputs, written only now that the run goes ahead: a refused run
  // (checkpoints of another run, another model) must leave the config of the run it named as it was.
  if (is_main(comm)) {
    fs::create_directories(t.out_dir);
    data::write_file_atomically((fs::path(t.out_dir) / "config.yaml").string(), config_yaml + "\n");
  }
  say(comm,
      fmt::format("stage {}: {} trainable parameters of {}; {} train / {} test samples; global batch {} "
                  "on {} ranks; steps {} → {}",
                  t.stage, count_elements(trainable), count_elements(model->parameters()), loader.size(),
                  test_set.size(), config.data.global_batch, world, start_step, t.steps));
  say(comm, fmt::format("optimizer: {}, {:.2f} MiB of moments on rank 0",
                        optimizer.sharded() ? fmt::format("ZeRO-1 AdamW over {} ranks", world) : "AdamW",
                        static_cast<double>(optimizer.state_bytes()) / (1 << 20)));

  // Gradients are averaged bucket by bucket while backward runs (Note [Bucketing order] in
  // comm/gradient_reducer.cpp); one process needs no reducer.
  // ZeRO-1 averages them in its step instead (Note [ZeRO-1 shards reuse AdamW] in
  // trainer/zero_optimizer.cpp).
  std::unique_ptr<comm::GradientReducer> reducer;
  if (comm && world > 1 && !optimizer.sharded()) {
    comm::ReducerOptions options{t.bucket_mib, t.first_bucket_mib};
    options.shared_memory = t.shared_memory_allreduce;
    reducer = std::make_unique<comm::GradientReducer>(trainable, comm, options);
    const size_t buckets = reducer->bucket_parameters().size();
    say(comm, fmt::format("gradients: {} bucket{}, all-reduced through {}", buckets, buckets == 1 ? "" : "s",
                          reducer->transport()));
  }

  ProgressLog log(t.out_dir + "/metrics.jsonl", start_step, t.steps, is_main(comm));
  TrainResult result;
  result.last_step = start_step;  // a resumed run with no step left reports its checkpoint's step
  int64_t total_corrupt = 0;
  for (int64_t step = start_step + 1; step <= t.steps; ++step) {
    const Clock::time_point step_start = Clock::now();
    const data::LoaderBatch loaded = loader.next();
    const double data_seconds = seconds_since(step_start);
    const std::string batch_hash = data::keys_fingerprint(loader.global_keys(loaded.epoch, loaded.step));
    int64_t corrupt_skipped = 0;
    const data::RetrievalBatch batch =
        agree_on_batch(loaded, test_set.dims(), comm, config.data.skip_corrupt, corrupt_skipped);
    total_corrupt += corrupt_skipped;

    const models::GeminiEmbeddings texts = model->encode_texts(batch.text_ids, batch.text_mask);
    const models::GeminiEmbeddings videos =
        model->encode_videos(batch.frames, batch.keypoints, batch.frame_mask);
    at::Tensor loss = model->contrastive_loss(texts, videos, comm);
    loss.backward();
    if (reducer) reducer->finalize();
    const double lr = warmup_cosine_lr(step, t.steps, config.optim.warmup_steps, config.optim.lr,
                                       config.optim.min_lr_ratio);
    const double grad_norm = optimizer.step(trainable, lr, config.optim.grad_clip);
    optimizer.zero_grad();
    model->clamp_logit_scale();  // the same on every rank: their τ agree

    // [loss, 1 if a preemption signal reached this rank], summed over the ranks: the collective that
    // averages the loss also tells every rank whether any was signalled.
    const int signal = preemption.received();
    at::Tensor totals = at::tensor({loss.detach().item<double>(), signal != 0 ? 1.0 : 0.0}, at::kDouble);
    if (comm && world > 1) comm->allreduce(totals, comm::ReduceOp::Sum);
    result.last_step = step;
    result.last_loss = totals[0].item<double>() / world;
    const auto signalled_ranks = static_cast<int64_t>(totals[1].item<double>());
    // Every rank holds the same sum, so all stop here together; nothing of this step is saved.
    if (!std::isfinite(result.last_loss)) {
      throw std::runtime_error(
          fmt::format("the loss is {} at step {}: the model diverged. HINT: lower optim.lr (now {}) or set "
                      "optim.grad_clip, "
                      "and start again or --resume from a checkpoint before it",
                      result.last_loss, step, config.optim.lr));
    }
    if (signal != 0) {
      std::fprintf(stderr,
                   "[rank %d] received %s by the end of step %lld: saving a checkpoint, then exiting\n", rank,
                   PreemptionSignals::name(signal).c_str(), static_cast<long long>(step));
      std::fflush(stderr);
    }
    const bool last = step == t.steps || step == t.stop_after;
    // At the last step (or train.stop_after) the run ends here anyway, with its checkpoint: a signal then
    // changes nothing (a requeue would only repeat the end), so the run finishes as it would have.
    const bool preempted = signalled_ranks > 0 && !last;
    const bool print = step % t.log_every == 0 || step == start_step + 1 || last || preempted;
    if (print) check_replicas_agree(model, comm, step);
    log.record({step, result.last_loss, lr, grad_norm, seconds_since(step_start), data_seconds,
                config.data.global_batch, batch_hash, total_corrupt},
               print);

    std::string saved;
    if (step % t.checkpoint_every == 0 || last || preempted) {
      saved = save_training_state(checkpoints, step, t.stage, model, optimizer, loader, config_yaml);
      say(comm, "saving checkpoint " + saved + " in the background");
    }
    // Not at the last step, which the held-out test covers; but at train.stop_after too, as the run that
    // does not stop there evaluates it.
    if (t.eval_every > 0 && step % t.eval_every == 0 && step != t.steps) {
      const RetrievalMetrics m = evaluate_retrieval(model, test_set, comm);
      say(comm, fmt::format("eval step {}: {}", step, m.summary()));
      log.record_json(fmt::format("{{\"step\": {}, \"eval\": {}}}", step, m.json()));
    }
    if (preempted) {       // after the evaluation due at this step, which the resumed run will not make
      checkpoints.wait();  // durable before the job may be requeued
      say(comm, fmt::format("preempted: a SIGTERM or SIGUSR1 reached {} of {} rank{} by the end of step {}; "
                            "checkpoint {} holds it. Exiting with status {}: a requeued job continues "
                            "with --resume",
                            signalled_ranks, world, world == 1 ? "" : "s", step, saved, kExitPreempted));
      result.preempted = true;
      break;
    }
    if (step == t.stop_after) {
      checkpoints.wait();
      say(comm, fmt::format("stopping after step {} as train.stop_after says; continue with --resume", step));
      result.stopped_early = true;
      break;
    }
  }
  if (reducer) {
    // What each step waited for the gradient all-reduce once backward was over (Note [Overlap statistics] in
    // comm/gradient_reducer.cpp); the slowest rank's wait bounds the step.
    const comm::ReducerStats stats = reducer->stats();
    const double exposed_ms = stats.steps > 0 ? 1e3 * stats.exposed_s / static_cast<double>(stats.steps) : 0;
    at::Tensor worst = at::full({1}, exposed_ms, at::kDouble);
    comm->allreduce(worst, comm::ReduceOp::Max);
    const size_t buckets = reducer->bucket_parameters().size();
    // A bucket is launched when its last gradient arrives: with one or two buckets, most of the reduction
    // waits for the end of backward. Say so, instead of leaving a long wait unexplained.
    const std::string few = buckets <= 2
                                ? " (with so few buckets, most gradients are all-reduced after backward "
                                  "ends; a smaller train.bucket_mib or train.first_bucket_mib makes more)"
                                : "";
    say(comm,
        fmt::format("gradient all-reduce: {} bucket{} per step; after backward, steps waited {:.2f} ms for "
                    "it on rank 0, {:.2f} ms on the slowest rank{}",
                    buckets, buckets == 1 ? "" : "s", exposed_ms, worst.item<double>(), few));
  }
  // Rank 0's wait, and the slowest rank's: a rank that waits longer holds every other one up in the next
  // collective, where rank 0 counts it as compute.
  const data::LoaderStats d = loader.stats();
  at::Tensor slowest_wait = at::full({1}, d.wait_seconds, at::kDouble);
  if (comm && world > 1) comm->allreduce(slowest_wait, comm::ReduceOp::Max);
  const auto per_step_ms = [&](double seconds) {
    return d.batches ? 1e3 * seconds / static_cast<double>(d.batches) : 0.0;
  };
  say(comm, fmt::format("data: {} batches, waited {:.2f} s in total ({:.2f} ms per step) on rank 0, {:.2f} s "
                        "({:.2f} ms per step) on the slowest rank",
                        d.batches, d.wait_seconds, per_step_ms(d.wait_seconds), slowest_wait.item<double>(),
                        per_step_ms(slowest_wait.item<double>())));
  if (!result.stopped_early && !result.preempted) {  // a run stopped early is evaluated when it finishes
    result.test = evaluate_retrieval(model, test_set, comm);
    log.record_json(fmt::format("{{\"step\": {}, \"test\": {}}}", result.last_step, result.test.json()));
    say(comm, fmt::format("held-out retrieval, stage {}: {}", t.stage, result.test.summary()));
  }
  if (const std::string last = checkpoints.wait(); !last.empty()) say(comm, "saved checkpoint " + last);
  if (watch) watch->finish();
  return result;
}

}  // namespace vimo::trainer
