// Implements the deterministic synthetic retrieval dataset of synthetic.h: a caption grammar, per-frame
// features driven by the object and color words, keypoint motion driven by the action and speed words.
#include "data/synthetic.h"

#include <fmt/format.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <stdexcept>

#include "data/dataset_writer.h"
#include "data/shard.h"

namespace vimo::data {
namespace {

namespace fs = std::filesystem;

// Caption grammar: "a person <action> <speed> holding a <color> <object>" (8 * 3 * 6 * 8 = 1152 captions).
// The action and speed words decide the keypoint motion only; the color and object words decide the
// visual features only. So an action-focused and an object-focused retriever each have their own signal.
const std::vector<std::string> kActions = {"waves", "jumps", "kicks",   "squats",
                                           "spins", "claps", "punches", "stretches"};
const std::vector<std::string> kSpeeds = {"slowly", "steadily", "quickly"};
const std::vector<std::string> kColors = {"red", "green", "blue", "yellow", "black", "white"};
const std::vector<std::string> kObjects = {"ball", "cup",      "box",    "phone",
                                           "book", "umbrella", "bottle", "racket"};
constexpr int64_t kCaptionTokens = 10;  // <bos> + 8 words + <eot>
// Motion cycles per F frames, per speed word: at least one full cycle even in the shortest (F/2) video.
constexpr std::array<double, 3> kSpeedCycles = {2.0, 3.0, 4.0};
constexpr int64_t kJoints = 17;

// A standing COCO-17 skeleton (x, y; y up), in body units: nose, eyes, ears, shoulders, elbows, wrists, hips,
// knees, ankles (left before right).
constexpr std::array<std::array<double, 2>, kJoints> kBaseSkeleton = {{
    {0.0, 1.7},
    {0.1, 1.8},
    {-0.1, 1.8},
    {0.2, 1.75},
    {-0.2, 1.75},
    {0.4, 1.3},
    {-0.4, 1.3},
    {0.6, 0.8},
    {-0.6, 0.8},
    {0.7, 0.3},
    {-0.7, 0.3},
    {0.25, 0.2},
    {-0.25, 0.2},
    {0.3, -0.6},
    {-0.3, -0.6},
    {0.3, -1.4},
    {-0.3, -1.4},
}};

// Stream constants: the "world" (word directions, motion patterns) is shared by both splits; each split
// draws its samples from its own stream, so train and test are independent draws of the same world.
constexpr uint64_t kWorldStream = 0x776f726c64ULL;  // "world"
constexpr uint64_t kTrainStream = 0x747261696eULL;  // "train"
constexpr uint64_t kTestStream = 0x74657374ULL;     // "test"

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Note [Portable random draws]: std::mt19937_64 is fully specified by the standard, but the std
// distributions (uniform_real, normal, uniform_int) are implementation-defined and differ across
// libstdc++/libc++ versions. So uniforms and normals are derived here by hand (53-bit uniforms,
// Box-Muller normals): the dataset's bytes depend only on the seed (and on libm's log/sin/cos, which are
// correctly rounded in practice on the platforms we build for).
class Rng {
 public:
  explicit Rng(uint64_t seed) : engine_(splitmix64(seed)) {}
  double uniform() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }  // [0, 1)
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  // Uniform in [0, n); the modulo bias is below n / 2^64, negligible for the small n used here.
  int64_t below(int64_t n) { return static_cast<int64_t>(engine_() % static_cast<uint64_t>(n)); }
  double normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double radius = std::sqrt(-2.0 * std::log(1.0 - uniform()));  // 1 - u in (0, 1]: log is finite
    const double angle = 2.0 * M_PI * uniform();
    spare_ = radius * std::sin(angle);
    has_spare_ = true;
    return radius * std::cos(angle);
  }

 private:
  std::mt19937_64 engine_;
  bool has_spare_ = false;
  double spare_ = 0.0;
};

// The fixed random structure both splits share: a feature direction per object and per color word, and a
// per-joint periodic motion (amplitude, phase per coordinate) per action word.
struct World {
  std::vector<std::vector<float>> object_directions, color_directions;  // [word][Dv]
  std::vector<std::vector<double>> amplitudes, phases;                  // [action][17 * 2]

  World(const SynthOptions& options, uint64_t seed) {
    Rng rng(seed);
    // Entries N(0, 1/2) each, so object + color has unit-variance entries, comparable to the noise std.
    auto direction = [&] {
      std::vector<float> d(options.feature_dim);
      for (float& v : d) v = static_cast<float>(rng.normal() * M_SQRT1_2);
      return d;
    };
    for (size_t i = 0; i < kObjects.size(); ++i) object_directions.push_back(direction());
    for (size_t i = 0; i < kColors.size(); ++i) color_directions.push_back(direction());
    for (size_t a = 0; a < kActions.size(); ++a) {
      std::vector<double> amplitude(kJoints * 2), phase(kJoints * 2);
      for (double& v : amplitude) v = rng.uniform(0.1, 1.0);
      for (double& v : phase) v = rng.uniform(0.0, 2.0 * M_PI);
      amplitudes.push_back(std::move(amplitude));
      phases.push_back(std::move(phase));
    }
  }
};

struct WordIds {
  int64_t action, speed, color, object;  // indices into kActions, kSpeeds, kColors, kObjects
};

int64_t token_id(const std::string& word) {
  const auto& vocab = synthetic_vocabulary();
  for (size_t i = 0; i < vocab.size(); ++i) {
    if (vocab[i] == word) return static_cast<int64_t>(i);
  }
  throw std::logic_error("synthetic vocabulary lacks the word '" + word + "'");
}

// One sample: caption words first, then frame count, features and keypoints, all from the split's stream.
Record make_sample(int64_t id, const SynthOptions& options, const World& world, Rng& rng) {
  const int64_t F = options.frames, Dv = options.feature_dim, L = options.max_text_len;
  const WordIds w{
      rng.below(static_cast<int64_t>(kActions.size())), rng.below(static_cast<int64_t>(kSpeeds.size())),
      rng.below(static_cast<int64_t>(kColors.size())), rng.below(static_cast<int64_t>(kObjects.size()))};
  const std::vector<std::string> words = {"a",       "person", kActions[w.action], kSpeeds[w.speed],
                                          "holding", "a",      kColors[w.color],   kObjects[w.object]};
  std::string caption;
  std::vector<int64_t> text_ids(L, 0);  // [L]: <bos> words <eot> <pad>...
  text_ids[0] = 1;
  for (size_t i = 0; i < words.size(); ++i) {
    caption += (i ? " " : "") + words[i];
    text_ids[i + 1] = token_id(words[i]);
  }
  text_ids[words.size() + 1] = 2;

  const int64_t min_frames = std::max<int64_t>(1, F / 2);
  const int64_t num_frames = min_frames + rng.below(F - min_frames + 1);

  // Visual features [F, Dv]: object + color direction, a slow per-sample brightness drift, noise. Nothing
  // here depends on the action or speed word.
  std::vector<float> frames(F * Dv, 0.0f);
  const double drift_phase = rng.uniform(0.0, 2.0 * M_PI);
  const std::vector<float>& object = world.object_directions[w.object];
  const std::vector<float>& color = world.color_directions[w.color];
  for (int64_t t = 0; t < num_frames; ++t) {
    const double scale =
        1.0 + 0.1 * std::sin(2.0 * M_PI * static_cast<double>(t) / static_cast<double>(F) + drift_phase);
    for (int64_t d = 0; d < Dv; ++d) {
      frames[t * Dv + d] = static_cast<float>(scale * (object[d] + color[d]) + options.noise * rng.normal());
    }
  }

  // Keypoints [F, 17, 3]: the base skeleton, placed and scaled at random, with every coordinate oscillating
  // with the action's per-joint amplitude and phase at the speed word's frequency; noise on (x, y);
  // confidence uniform in [0.5, 1]. Nothing here depends on the color or object word.
  std::vector<float> keypoints(F * kJoints * 3, 0.0f);
  const double omega = 2.0 * M_PI * kSpeedCycles[w.speed] / static_cast<double>(F);
  const double start_phase = rng.uniform(0.0, 2.0 * M_PI);
  const double body_scale = rng.uniform(0.9, 1.1), shift_x = 0.2 * rng.normal(), shift_y = 0.2 * rng.normal();
  const std::vector<double>& amplitude = world.amplitudes[w.action];
  const std::vector<double>& phase = world.phases[w.action];
  for (int64_t t = 0; t < num_frames; ++t) {
    for (int64_t j = 0; j < kJoints; ++j) {
      float* point = &keypoints[(t * kJoints + j) * 3];
      for (int64_t c = 0; c < 2; ++c) {
        const double motion =
            amplitude[j * 2 + c] * std::sin(omega * static_cast<double>(t) + phase[j * 2 + c] + start_phase);
        const double shift = c == 0 ? shift_x : shift_y;
        point[c] = static_cast<float>(body_scale * (kBaseSkeleton[j][c] + motion) + shift +
                                      options.noise * rng.normal());
      }
      point[2] = static_cast<float>(rng.uniform(0.5, 1.0));
    }
  }

  Record record;
  record.fields.push_back(Field::from_int64s("id", {1}, {id}));
  record.fields.push_back(Field::from_string("caption", caption));
  record.fields.push_back(Field::from_int64s("text_ids", {L}, text_ids));
  record.fields.push_back(Field::from_floats("frames", {F, Dv}, frames));
  record.fields.push_back(Field::from_floats("keypoints", {F, kJoints, 3}, keypoints));
  record.fields.push_back(Field::from_int64s("num_frames", {1}, {num_frames}));
  return record;
}

void check_options(const SynthOptions& o) {
  auto require = [](bool ok, const std::string& what) {
    if (!ok) throw std::runtime_error("synthetic dataset options: " + what);
  };
  require(o.num_train > 0 && o.num_test > 0,
          fmt::format("num_train and num_test must be positive, found {} and {}", o.num_train, o.num_test));
  require(o.frames > 0, fmt::format("frames must be positive, found {}", o.frames));
  require(o.feature_dim > 0, fmt::format("feature_dim must be positive, found {}", o.feature_dim));
  require(o.records_per_shard > 0,
          fmt::format("records_per_shard must be positive, found {}", o.records_per_shard));
  require(o.max_text_len >= kCaptionTokens,
          fmt::format("max_text_len must be at least {} (<bos>, 8 caption words, <eot>), found {}",
                      kCaptionTokens, o.max_text_len));
  require(o.noise >= 0.0 && std::isfinite(o.noise),
          fmt::format("noise must be finite and >= 0, found {}", o.noise));
  const int64_t largest = std::max(o.num_train, o.num_test);
  require((largest - 1) / o.records_per_shard < 100000,
          "more than 99999 shards per split (5-digit names); raise records_per_shard");
}

}  // namespace

const std::vector<std::string>& synthetic_vocabulary() {
  static const std::vector<std::string> vocabulary = [] {
    std::vector<std::string> words = {"<pad>", "<bos>", "<eot>", "a", "person", "holding"};
    for (const auto* group : {&kActions, &kSpeeds, &kColors, &kObjects})
      words.insert(words.end(), group->begin(), group->end());
    return words;
  }();
  return vocabulary;
}

void write_synthetic_dataset(const SynthOptions& options, const std::string& dir) {
  check_options(options);
  DatasetWriterOptions writer_options;
  writer_options.max_shard_records = static_cast<uint64_t>(options.records_per_shard);
  writer_options.max_shard_bytes = ~0ull;  // shards are cut by record count only, as the options say
  writer_options.compression = options.zstd ? Compression::Zstd : Compression::None;
  DatasetWriter writer(dir, "retrieval", writer_options);

  const World world(options, options.seed ^ kWorldStream);
  const auto write_split = [&](const std::string& split, int64_t count, uint64_t stream) {
    Rng rng(stream);
    for (int64_t id = 0; id < count; ++id) writer.append(split, make_sample(id, options, world, rng));
  };
  write_split("train", options.num_train, options.seed ^ kTrainStream);
  write_split("test", options.num_test, options.seed ^ kTestStream);

  std::string vocab;
  for (const std::string& word : synthetic_vocabulary()) vocab += word + "\n";
  writer.add_file("vocab.txt", vocab);
  writer.set_metadata("generator", "synthetic");
  writer.set_metadata("options", {{"num_train", options.num_train},
                                  {"num_test", options.num_test},
                                  {"frames", options.frames},
                                  {"feature_dim", options.feature_dim},
                                  {"max_text_len", options.max_text_len},
                                  {"records_per_shard", options.records_per_shard},
                                  {"seed", options.seed},
                                  {"noise", options.noise},
                                  {"zstd", options.zstd}});
  writer.set_metadata("vocab_size", synthetic_vocabulary().size());
  writer.finish();
}

}  // namespace vimo::data
