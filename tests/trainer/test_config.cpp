// Tests the training config (trainer/config.h): defaults, every field loaded from a file, overrides, the
// exact wording of every user error (file, line, key path), cross-field rules, and that to_yaml() of a random
// config loads back to the same config.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "tests/random_seed.h"
#include "trainer/config.h"

namespace vimo::trainer {
namespace {

// Every field of a Config, written out here (not taken from config.cpp's table) so that a field the table
// forgets makes these tests fail.
// clang-format off
#define VIMO_CONFIG_FIELDS(X) \
  X(model.vocab_size) \
  X(model.max_text_len) \
  X(model.frames) \
  X(model.feature_dim) \
  X(model.joints) \
  X(model.embed_dim) \
  X(model.width) \
  X(model.heads) \
  X(model.text_layers) \
  X(model.video_layers) \
  X(model.keypoint_width) \
  X(model.spatio_temporal_layers) \
  X(model.temporal_layers) \
  X(model.action_scale) \
  X(model.logit_scale_init) \
  X(model.logit_scale_max) \
  X(data.dir) \
  X(data.global_batch) \
  X(data.seed) \
  X(data.shuffle_block) \
  X(data.workers) \
  X(data.prefetch) \
  X(data.skip_corrupt) \
  X(data.verify) \
  X(data.drop_last) \
  X(data.open_shards) \
  X(optim.lr) \
  X(optim.min_lr_ratio) \
  X(optim.warmup_steps) \
  X(optim.weight_decay) \
  X(optim.beta1) \
  X(optim.beta2) \
  X(optim.eps) \
  X(optim.grad_clip) \
  X(optim.zero_stage) \
  X(train.stage) \
  X(train.steps) \
  X(train.log_every) \
  X(train.eval_every) \
  X(train.checkpoint_every) \
  X(train.keep_checkpoints) \
  X(train.stop_after) \
  X(train.out_dir) \
  X(train.init_from) \
  X(train.threads) \
  X(train.seed)
// clang-format on

void expect_same(const Config& actual, const Config& expected) {
#define VIMO_EXPECT_SAME(field) EXPECT_EQ(actual.field, expected.field) << #field;
  VIMO_CONFIG_FIELDS(VIMO_EXPECT_SAME)
#undef VIMO_EXPECT_SAME
}

// A YAML file in the temporary directory, removed when it goes out of scope.
class TempYaml {
 public:
  explicit TempYaml(const std::string& text) {
    static int count = 0;
    path_ = (std::filesystem::temp_directory_path() /
             ("vimo_test_config_" + std::to_string(getpid()) + "_" + std::to_string(count++) + ".yaml"))
                .string();
    std::ofstream(path_) << text;
  }
  ~TempYaml() { std::filesystem::remove(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// The message of the ConfigError that `run` throws, or a note that it threw none.
std::string error_of(const std::function<void()>& run) {
  try {
    run();
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no ConfigError)";
}

std::string load_error(const TempYaml& file, const std::vector<std::string>& overrides = {}) {
  return error_of([&] { load_config(file.path(), overrides); });
}

// A config whose line 7 is `  <entry>` under `<section>:`, after lines of another section and a comment, so
// an error about the entry must say "<file>:7:".
std::string entry_on_line_7(const std::string& section, const std::string& entry) {
  const std::string other = section == "optim" ? "data:\n  global_batch: 8\n" : "optim:\n  lr: 0.5\n";
  return "# The entry under test is on line 7.\n" + other + "\n  # a comment\n" + section + ":\n  " + entry +
         "\n";
}

void expect_starts_with(const std::string& message, const std::string& prefix) {
  EXPECT_EQ(message.substr(0, prefix.size()), prefix) << "whole message: " << message;
}

const std::string kModelKeys =
    "vocab_size, max_text_len, frames, feature_dim, joints, embed_dim, width, heads, text_layers, "
    "video_layers, keypoint_width, spatio_temporal_layers, temporal_layers, action_scale, logit_scale_init, "
    "logit_scale_max";
const std::string kOptimKeys =
    "lr, min_lr_ratio, warmup_steps, weight_decay, beta1, beta2, eps, grad_clip, zero_stage";
const std::string kSections = "model, data, optim, train";

TEST(Config, DefaultsAreValidAndAnEmptyFileKeepsThem) {
  EXPECT_NO_THROW(validate(Config{}, "defaults"));
  const TempYaml empty("");
  expect_same(load_config(empty.path()), Config{});
  const TempYaml only_comments("# nothing set\n");
  expect_same(load_config(only_comments.path()), Config{});
  const TempYaml empty_sections("model:\ndata:\noptim:\ntrain:\n");
  expect_same(load_config(empty_sections.path()), Config{});
}

TEST(Config, FullFileSetsEveryField) {
  const TempYaml file(R"(model:
  vocab_size: 1000
  max_text_len: 32
  frames: 8
  feature_dim: 512
  joints: 25
  embed_dim: 258
  width: 96
  heads: 6
  text_layers: 3
  video_layers: 4
  keypoint_width: 48
  spatio_temporal_layers: 2
  temporal_layers: 5
  action_scale: 50.5
  logit_scale_init: 1.25
  logit_scale_max: 3.5
data:
  dir: "data/with space"
  global_batch: 128
  seed: 18446744073709551615
  shuffle_block: 17
  workers: 0
  prefetch: 9
  skip_corrupt: true
  verify: first_read
  drop_last: false
  open_shards: 3
optim:
  lr: 3.0e-4
  min_lr_ratio: 0
  warmup_steps: 0
  weight_decay: 0.05
  beta1: 0.85
  beta2: 0.999
  eps: 1e-6
  grad_clip: 0
  zero_stage: 1
train:
  stage: router
  steps: 1000
  log_every: 7
  eval_every: 250
  checkpoint_every: 500
  keep_checkpoints: 5
  stop_after: 600
  out_dir: runs/full
  init_from: runs/previous
  threads: 4
  seed: +7
)");
  Config expected;
  expected.model.vocab_size = 1000;
  expected.model.max_text_len = 32;
  expected.model.frames = 8;
  expected.model.feature_dim = 512;
  expected.model.joints = 25;
  expected.model.embed_dim = 258;
  expected.model.width = 96;
  expected.model.heads = 6;
  expected.model.text_layers = 3;
  expected.model.video_layers = 4;
  expected.model.keypoint_width = 48;
  expected.model.spatio_temporal_layers = 2;
  expected.model.temporal_layers = 5;
  expected.model.action_scale = 50.5;
  expected.model.logit_scale_init = 1.25;
  expected.model.logit_scale_max = 3.5;
  expected.data.dir = "data/with space";
  expected.data.global_batch = 128;
  expected.data.seed = std::numeric_limits<uint64_t>::max();
  expected.data.shuffle_block = 17;
  expected.data.workers = 0;
  expected.data.prefetch = 9;
  expected.data.skip_corrupt = true;
  expected.data.verify = "first_read";
  expected.data.drop_last = false;
  expected.data.open_shards = 3;
  expected.optim.lr = 3.0e-4;
  expected.optim.min_lr_ratio = 0;
  expected.optim.warmup_steps = 0;
  expected.optim.weight_decay = 0.05;
  expected.optim.beta1 = 0.85;
  expected.optim.beta2 = 0.999;
  expected.optim.eps = 1e-6;
  expected.optim.grad_clip = 0;
  expected.optim.zero_stage = 1;
  expected.train.stage = "router";
  expected.train.steps = 1000;
  expected.train.log_every = 7;
  expected.train.eval_every = 250;
  expected.train.checkpoint_every = 500;
  expected.train.keep_checkpoints = 5;
  expected.train.stop_after = 600;
  expected.train.out_dir = "runs/full";
  expected.train.init_from = "runs/previous";
  expected.train.threads = 4;
  expected.train.seed = 7;
  // A field left at its default would not show that the file set it.
  const Config defaults;
#define VIMO_EXPECT_CHANGED(field) EXPECT_NE(expected.field, defaults.field) << #field;
  VIMO_CONFIG_FIELDS(VIMO_EXPECT_CHANGED)
#undef VIMO_EXPECT_CHANGED
  expect_same(load_config(file.path()), expected);
}

TEST(Config, PartialFileKeepsOtherDefaults) {
  const TempYaml file("optim:\n  lr: 0.25\ntrain:\n  stage: object\n");
  Config expected;
  expected.optim.lr = 0.25;
  expected.train.stage = "object";
  expect_same(load_config(file.path()), expected);
}

TEST(Config, OverridesWinOverTheFileInOrder) {
  const TempYaml file("optim:\n  lr: 0.5\n  beta1: 0.8\ntrain:\n  stage: object\n  init_from: runs/a\n");
  Config expected;
  expected.optim.lr = 0.125;
  expected.optim.beta1 = 0.8;
  expected.train.stage = "router";
  expected.train.init_from = "";
  expected.model.width = 128;
  expected.data.dir = "a dir: with # signs";
  expect_same(
      load_config(file.path(), {"optim.lr=0.25", "train.stage=router", "model.width = 128",
                                "train.init_from=", "data.dir='a dir: with # signs'", "optim.lr=0.125"}),
      expected);
}

TEST(Config, OverridesAreTypeAndRangeChecked) {
  const TempYaml file("");
  EXPECT_EQ(load_error(file, {"model.width=abc"}),
            "override 'model.width=abc': model.width: expected an integer, found 'abc'");
  EXPECT_EQ(load_error(file, {"optim.lr=-1"}),
            "override 'optim.lr=-1': optim.lr: expected a number > 0, found '-1'");
  EXPECT_EQ(load_error(file, {"data.seed=-3"}),
            "override 'data.seed=-3': data.seed: expected a non-negative integer, found '-3'");
  EXPECT_EQ(load_error(file, {"optim.lr="}),
            "override 'optim.lr=': optim.lr: expected a number, found an empty value");
  EXPECT_EQ(load_error(file, {"optim.lr=[1, 2]"}),
            "override 'optim.lr=[1, 2]': optim.lr: expected a number, found a list");
  EXPECT_EQ(load_error(file, {"optim.lrr=1"}),
            "override 'optim.lrr=1': unknown key 'optim.lrr' (known keys in 'optim': " + kOptimKeys +
                "); did you mean 'optim.lr'?");
  EXPECT_EQ(load_error(file, {"lr=1"}), "override 'lr=1': unknown key 'lr' (known sections: " + kSections +
                                            "); did you mean 'optim.lr'?");
  expect_starts_with(load_error(file, {"optim.lr=[1"}),
                     "override 'optim.lr=[1': optim.lr: the value is not valid YAML: ");
}

TEST(Config, MalformedOverridesAreErrors) {
  const TempYaml file("");
  EXPECT_EQ(load_error(file, {"optim.lr"}),
            "override 'optim.lr': expected key.path=value, e.g. optim.lr=3e-4");
  EXPECT_EQ(load_error(file, {"=3"}), "override '=3': expected key.path=value, e.g. optim.lr=3e-4");
  EXPECT_EQ(
      load_error(file, {"optim=3"}),
      "override 'optim=3': 'optim' is a section, not a key (known keys in 'optim': " + kOptimKeys + ")");
  expect_starts_with(load_error(file, {"optim.lr.x=3"}), "override 'optim.lr.x=3': unknown key 'optim.lr.x'");
}

struct BadEntry {
  std::string section;
  std::string entry;
  std::string message;  // after "<file>:7: "
};

void expect_errors_on_line_7(const std::vector<BadEntry>& cases) {
  for (const BadEntry& bad : cases) {
    SCOPED_TRACE(bad.section + ": " + bad.entry);
    const TempYaml file(entry_on_line_7(bad.section, bad.entry));
    EXPECT_EQ(load_error(file), file.path() + ":7: " + bad.message);
  }
}

TEST(Config, UnknownKeyNamesItsPathLineAndKnownKeys) {
  expect_errors_on_line_7({
      {"optim", "learning_rate: 0.1",
       "unknown key 'optim.learning_rate' (known keys in 'optim': " + kOptimKeys + ")"},
      {"optim", "lrr: 0.1",
       "unknown key 'optim.lrr' (known keys in 'optim': " + kOptimKeys + "); did you mean 'optim.lr'?"},
      {"model", "lr: 0.1",
       "unknown key 'model.lr' (known keys in 'model': " + kModelKeys + "); did you mean 'optim.lr'?"},
  });
  const TempYaml top_level("model:\n  width: 64\n\n# a comment\noptim:\n  lr: 0.1\ntrian:\n  steps: 3\n");
  EXPECT_EQ(load_error(top_level), top_level.path() + ":7: unknown key 'trian' (known sections: " +
                                       kSections + "); did you mean 'train'?");
}

TEST(Config, WrongTypeNamesKeyAndLine) {
  expect_errors_on_line_7({
      {"optim", "warmup_steps: 1.5", "optim.warmup_steps: expected an integer, found '1.5'"},
      {"model", "width: 12abc", "model.width: expected an integer, found '12abc'"},
      {"model", "heads: 1e3", "model.heads: expected an integer, found '1e3'"},
      {"model", "heads:", "model.heads: expected an integer, found an empty value"},
      {"optim", "lr: fast", "optim.lr: expected a number, found 'fast'"},
      {"optim", "lr: .nan", "optim.lr: expected a number, found '.nan'"},
      {"optim", "lr: {value: 1}", "optim.lr: expected a number, found a map"},
      {"train", "steps: [1, 2]", "train.steps: expected an integer, found a list"},
      {"train", "out_dir: {a: 1}", "train.out_dir: expected a string, found a map"},
      {"data", "seed: -1", "data.seed: expected a non-negative integer, found '-1'"},
      {"train", "steps: 99999999999999999999",
       "train.steps: expected an integer, found '99999999999999999999'"},
  });
}

TEST(Config, OutOfRangeNamesKeyLineAndRange) {
  expect_errors_on_line_7({
      {"optim", "lr: -1", "optim.lr: expected a number > 0, found '-1'"},
      {"optim", "eps: 0", "optim.eps: expected a number > 0, found '0'"},
      {"optim", "min_lr_ratio: 1.5", "optim.min_lr_ratio: expected a number in [0, 1], found '1.5'"},
      {"optim", "beta2: 1", "optim.beta2: expected a number in [0, 1), found '1'"},
      {"optim", "grad_clip: -0.5", "optim.grad_clip: expected a number >= 0, found '-0.5'"},
      {"optim", "zero_stage: 2", "optim.zero_stage: expected an integer in [0, 1], found '2'"},
      {"model", "heads: 0", "model.heads: expected an integer >= 1, found '0'"},
      {"model", "action_scale: 0", "model.action_scale: expected a number in (0, 10000], found '0'"},
      {"model", "action_scale: 1e5", "model.action_scale: expected a number in (0, 10000], found '1e5'"},
      // exp(100) is not a float32: a scale like that trains NaN.
      {"model", "logit_scale_max: 100", "model.logit_scale_max: expected a number in [-10, 10], found '100'"},
      {"model", "logit_scale_init: -11",
       "model.logit_scale_init: expected a number in [-10, 10], found '-11'"},
      // Counts the code keeps as int: 2^32 + 1 would become 1.
      {"data", "workers: 4294967297", "data.workers: expected an integer in [0, 4096], found '4294967297'"},
      {"data", "prefetch: 5000", "data.prefetch: expected an integer in [0, 4096], found '5000'"},
      {"train", "threads: 4294967296", "train.threads: expected an integer in [1, 4096], found '4294967296'"},
      {"train", "heartbeat_s: 0.0001",
       "train.heartbeat_s: expected a number in [0.001, 3600], found '0.0001'"},
      {"train", "watchdog_timeout_s: 1e300",
       "train.watchdog_timeout_s: expected a number in [0, 86400], found '1e300'"},
      {"train", "eval_every: -5", "train.eval_every: expected an integer >= 0, found '-5'"},
      {"train", "stage: pretrain", "train.stage: expected one of action, object, router, found 'pretrain'"},
      {"train", "out_dir: ''", "train.out_dir: expected a non-empty string, found ''"},
      {"data", "dir:", "data.dir: expected a non-empty string, found ''"},
  });
}

TEST(Config, FileStructureErrors) {
  const TempYaml duplicate("optim:\n  lr: 0.1\n  lr: 0.2\n");
  EXPECT_EQ(load_error(duplicate), duplicate.path() + ":3: duplicate key 'optim.lr' (first set on line 2)");
  const TempYaml section_not_map("train:\n  steps: 3\nmodel: 3\n");
  EXPECT_EQ(load_error(section_not_map),
            section_not_map.path() + ":3: model: expected a map of keys (" + kModelKeys + "), found '3'");
  const TempYaml list("- model\n");
  EXPECT_EQ(load_error(list),
            list.path() + ":1: expected a map of sections (" + kSections + "), found a list");
  // Nothing after the first document may go unread: a second document, or text after `...`.
  const TempYaml two_documents("optim:\n  lr: 0.5\n---\noptim:\n  lr: 7\n  bogus: 1\n");
  EXPECT_EQ(
      load_error(two_documents),
      two_documents.path() +
          ": holds 2 YAML documents (separated by --- or ...); a config is one. HINT: merge them, or keep "
          "the others in files of their own");
  const TempYaml after_end("optim:\n  lr: 0.25\n...\ngarbage: [\n");
  expect_starts_with(load_error(after_end), after_end.path() + ":");
  EXPECT_NE(load_error(after_end), "(no ConfigError)");
  const TempYaml one_marked_document("---\noptim:\n  lr: 0.25\n...\n");
  EXPECT_EQ(load_error(one_marked_document), "(no ConfigError)");
  const TempYaml trailing_marker("optim:\n  lr: 0.25\n---\n");  // an empty second document
  EXPECT_EQ(load_error(trailing_marker), "(no ConfigError)");
  expect_starts_with(error_of([] { load_config("/nonexistent/vimo.yaml"); }),
                     "config file '/nonexistent/vimo.yaml' not found (relative paths start at ");
}

TEST(Config, SyntaxErrorNamesFileAndLine) {
  const TempYaml file("model:\n  width: 64\n heads: 4\n");
  EXPECT_EQ(load_error(file), file.path() + ":3: invalid YAML: end of map not found");
}

TEST(Config, CrossFieldRules) {
  const TempYaml file("model:\n  width: 64\n  keypoint_width: 32\n");
  EXPECT_EQ(load_error(file, {"model.heads=3"}),
            file.path() + " with override 'model.heads=3': model.heads (3) must divide model.width (64)");
  EXPECT_EQ(
      load_error(file, {"model.keypoint_width=30"}),
      file.path() +
          " with override 'model.keypoint_width=30': model.heads (4) must divide model.keypoint_width (30)");
  EXPECT_EQ(load_error(file, {"model.logit_scale_init=5", "model.logit_scale_max=4.5"}),
            file.path() +
                " with override 'model.logit_scale_init=5', 'model.logit_scale_max=4.5': "
                "model.logit_scale_init (5) must be <= model.logit_scale_max (4.5)");
  EXPECT_EQ(load_error(file, {"train.stop_after=300"}),
            file.path() +
                " with override 'train.stop_after=300': train.stop_after (300) must be <= train.steps (200)");
  EXPECT_EQ(
      load_error(file, {"train.steps=10"}),
      file.path() + " with override 'train.steps=10': optim.warmup_steps (20) must be <= train.steps (10)");
  EXPECT_EQ(load_error(file, {"model.heads=8", "train.stop_after=200", "optim.warmup_steps=200"}),
            "(no ConfigError)");
  // A heartbeat as long as the watchdog's timeout would declare every rank missing (checked on one rank too,
  // where no watchdog runs, so that the config fails before it reaches a cluster).
  EXPECT_EQ(load_error(file, {"train.heartbeat_s=5", "train.watchdog_timeout_s=2"}),
            file.path() +
                " with override 'train.heartbeat_s=5', 'train.watchdog_timeout_s=2': train.heartbeat_s (5) "
                "must be < train.watchdog_timeout_s (2): a rank is declared missing after "
                "that many seconds without a heartbeat. HINT: a timeout of several heartbeats, or "
                "train.watchdog_timeout_s=0 for no watchdog");
  EXPECT_EQ(load_error(file, {"train.heartbeat_s=5", "train.watchdog_timeout_s=0"}), "(no ConfigError)");

  // validate() also applies the per-field rules to a config built in code.
  Config config;
  config.optim.lr = -1;
  EXPECT_EQ(error_of([&] { validate(config, "in-memory"); }),
            "in-memory: optim.lr: expected a number > 0, found '-1'");
  config = Config{};
  config.train.stage = "pretrain";
  EXPECT_EQ(error_of([&] { validate(config, "in-memory"); }),
            "in-memory: train.stage: expected one of action, object, router, found 'pretrain'");
}

// A config with every field drawn at random within its rules, with full-precision doubles and strings
// full of characters that YAML treats specially.
Config random_config(std::mt19937_64& rng) {
  const auto integer = [&](int64_t low, int64_t high) {
    return std::uniform_int_distribution<int64_t>(low, high)(rng);
  };
  const auto number = [&](double low, double high) {
    return std::uniform_real_distribution<double>(low, high)(rng);
  };
  const auto log_number = [&](double low_exponent, double high_exponent) {
    return std::pow(10.0, number(low_exponent, high_exponent));
  };
  const auto text = [&](int64_t min_length) {
    static const std::string alphabet = "az09 _-./:#'\"!&*[]{}%@`~,?|>\\=+\t";
    std::string result(integer(min_length, 10), ' ');
    for (char& c : result) c = alphabet[integer(0, static_cast<int64_t>(alphabet.size()) - 1)];
    return result;
  };
  const int64_t big = std::numeric_limits<int64_t>::max();
  Config c;
  ModelConfig& m = c.model;
  for (int64_t* count : {&m.vocab_size, &m.max_text_len, &m.frames, &m.feature_dim, &m.joints, &m.embed_dim,
                         &m.text_layers, &m.video_layers, &m.spatio_temporal_layers, &m.temporal_layers}) {
    *count = integer(1, big);
  }
  m.heads = integer(1, 64);
  m.width = m.heads * integer(1, 1 << 20);
  m.keypoint_width = m.heads * integer(1, 1 << 20);
  m.embed_dim = m.heads * integer(1, 1 << 20);
  m.action_scale = log_number(-3, 3);
  m.logit_scale_init = number(-10, 10);
  m.logit_scale_max = number(m.logit_scale_init, 10);
  c.data.dir = text(1);
  c.data.global_batch = integer(1, big);
  c.data.seed = rng();
  OptimConfig& o = c.optim;
  o.lr = log_number(-12, 1);
  o.min_lr_ratio = number(0, 1);
  o.weight_decay = log_number(-8, 0);
  o.beta1 = number(0, 1);
  o.beta2 = number(0, 1);
  o.eps = log_number(-15, -3);
  o.grad_clip = number(0, 100);
  o.zero_stage = integer(0, 1);
  TrainConfig& t = c.train;
  t.stage = std::vector<std::string>{"action", "object", "router"}[integer(0, 2)];
  t.steps = integer(1, big);
  o.warmup_steps = integer(0, t.steps);
  t.stop_after = integer(0, t.steps);
  t.log_every = integer(1, big);
  t.eval_every = integer(0, big);
  t.checkpoint_every = integer(1, big);
  t.keep_checkpoints = integer(1, 100);
  t.out_dir = text(1);
  t.init_from = text(0);
  t.threads = integer(1, 256);
  t.seed = rng();
  return c;
}

TEST(Config, ToYamlListsEveryKeyInSectionOrder) {
  const std::string yaml = to_yaml(Config{});
  size_t last = 0;
  for (const char* section : {"model:", "data:", "optim:", "train:"}) {
    const size_t at = yaml.find(section);
    ASSERT_NE(at, std::string::npos) << section << " missing from\n" << yaml;
    EXPECT_GE(at, last) << section << " out of order in\n" << yaml;
    last = at;
  }
#define VIMO_EXPECT_LISTED(field)                                                           \
  EXPECT_NE(yaml.find(std::string(#field).substr(std::string(#field).find('.') + 1) + ":"), \
            std::string::npos)                                                              \
      << #field;
  VIMO_CONFIG_FIELDS(VIMO_EXPECT_LISTED)
#undef VIMO_EXPECT_LISTED
}

TEST(Config, ToYamlLoadsBackExactly) {
  const uint64_t seed = vimo::testing::fresh_seed();
  std::printf("[ seed     ] VIMO_TEST_SEED=%llu\n", static_cast<unsigned long long>(seed));
  SCOPED_TRACE("VIMO_TEST_SEED=" + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int trial = 0; trial < 200; ++trial) {
    const Config config = random_config(rng);
    ASSERT_NO_THROW(validate(config, "random config"));
    const std::string yaml = to_yaml(config);
    SCOPED_TRACE("trial " + std::to_string(trial) + ", YAML:\n" + yaml);
    const TempYaml file(yaml);
    Config loaded;
    ASSERT_NO_THROW(loaded = load_config(file.path()));
    expect_same(loaded, config);
    EXPECT_EQ(to_yaml(loaded), yaml);
    if (::testing::Test::HasFailure()) return;
  }
}

}  // namespace
}  // namespace vimo::trainer
