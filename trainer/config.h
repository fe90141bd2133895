// Defines the typed training configuration, its YAML loader with validation and `key.path=value`
// overrides, and its YAML rendering (printed at start, saved next to checkpoints).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "models/gemini_config.h"

namespace vimo::trainer {

// Sizes of the Gemini-MVR model live with the model (models/gemini_config.h).
using ModelConfig = vimo::models::GeminiConfig;

struct DataConfig {
  std::string dir = "runs/data/demo";  // dataset directory (train/, test/, vocab.txt)
  int64_t global_batch = 64;           // samples per optimizer step across all DP ranks
  uint64_t seed = 1234;                // sample order
  int64_t shuffle_block = 4096;        // samples per shuffle block (Note [Block shuffle across shards])
  int64_t workers = 2;                 // background reader threads
  int64_t prefetch = 4;                // batches read ahead
  bool skip_corrupt = false;           // skip and count corrupt records instead of stopping
  std::string verify = "every_read";   // every_read, or first_read (data::Verification)
  bool drop_last = true;               // false: an epoch's last global batch is completed from its start
  int64_t open_shards = 64;            // shard files kept open and mapped (least recently used closed)
};

struct OptimConfig {
  double lr = 1e-3;
  double min_lr_ratio = 0.1;  // cosine decays to lr * min_lr_ratio
  int64_t warmup_steps = 20;
  double weight_decay = 0.01;
  double beta1 = 0.9;
  double beta2 = 0.98;
  double eps = 1e-8;
  double grad_clip = 1.0;  // max global gradient L2 norm; 0 disables
  // 0: every DP rank keeps AdamW's whole moments (gradients averaged during backward by the GradientReducer);
  // 1: ZeRO-1, each rank keeps and updates 1/DP of them (trainer/zero_optimizer.h). Checkpoints are the same.
  int64_t zero_stage = 0;
};

struct TrainConfig {
  std::string stage = "action";  // "action", "object" or "router" (DESIGN.md: which parameters train)
  int64_t steps = 200;           // total optimizer steps of this stage
  int64_t log_every = 10;
  int64_t eval_every = 0;  // held-out retrieval metrics every N steps; 0 = only at the end
  int64_t checkpoint_every = 100;
  int64_t keep_checkpoints = 2;  // newest N checkpoints retained
  int64_t stop_after = 0;        // stop (after saving) at this step, as if interrupted; 0 = never
  std::string out_dir = "runs/demo";
  std::string init_from;                // run or checkpoint directory: initial weights
  int64_t threads = 1;                  // intra-op CPU threads per rank (fixed, for reproducibility)
  uint64_t seed = 42;                   // parameter initialization
  double bucket_mib = 25;               // gradient all-reduce bucket size (comm::GradientReducer)
  double first_bucket_mib = 1;          // ... of the first bucket, launched earliest in backward
  bool shared_memory_allreduce = true;  // all ranks on one host: buckets all-reduced through shared memory
  double watchdog_timeout_s = 60;       // a rank or the store silent this long ends the job (0: no watchdog)
  double heartbeat_s = 1;               // heartbeat interval of the watchdog
};

struct Config {
  ModelConfig model;
  DataConfig data;
  OptimConfig optim;
  TrainConfig train;
};

// A user error in a config: message names the file, the key path and the line, e.g.
//   configs/demo/x.yaml:12: optim.lr: expected a number > 0, found '-1'
class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Loads `path` (YAML), applies `overrides` ("key.path=value", value parsed as YAML scalar), validates.
// Keys absent from the file keep their defaults. Unknown keys, wrong types, out-of-range values and
// malformed overrides throw ConfigError.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});

// Validates cross-field rules (e.g. heads divides width, stage is known); throws ConfigError.
void validate(const Config& config, const std::string& source);

// The whole resolved config as YAML (every key, including defaults); load_config of it gives it back.
std::string to_yaml(const Config& config);

}  // namespace vimo::trainer
