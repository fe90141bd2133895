// Implements the `vimo data` subcommands: option parsing with CLI11 and a summary line per command.
#include "trainer/data_cli.h"

#include <fmt/format.h>

#include <cstdio>

#include "data/import_humanml3d.h"
#include "data/import_videos.h"
#include "data/manifest.h"
#include "data/pack.h"
#include "data/synthetic.h"
#include "data/tokenizer.h"

namespace vimo::trainer {

struct DataCommands::Options {
  CLI::App *synth = nullptr, *humanml3d = nullptr, *videos = nullptr, *pack = nullptr, *verify = nullptr;
  data::SynthOptions synth_options;
  std::string synth_out = "runs/data/demo";
  std::string source, out;
  data::HumanML3DImportOptions humanml3d_options;
  data::VideoImportOptions video_options;
  std::string tokenizer = "unigram";
  // Shard options shared by every writing command.
  double max_shard_mb = 256;
  uint64_t max_shard_records = 0;
  bool zstd = false;
  int zstd_level = 3;
  bool skip_hashes = false;

  data::DatasetWriterOptions writer() const {
    data::DatasetWriterOptions w;
    w.max_shard_bytes = static_cast<uint64_t>(max_shard_mb * 1024 * 1024);
    w.max_shard_records = max_shard_records;
    w.compression = zstd ? data::Compression::Zstd : data::Compression::None;
    w.zstd_level = zstd_level;
    return w;
  }
  void add_shard_options(CLI::App* command) {
    command->add_option("--max-shard-mb", max_shard_mb, "Close a shard once it reaches this size")
        ->capture_default_str()
        ->check(CLI::Range(1.0 / 1024, 1024.0 * 1024));  // 1 KiB to 1 TiB: bytes fit a uint64 with room
    command->add_option("--max-shard-records", max_shard_records, "... or this many records (0: no limit)")
        ->capture_default_str();
    command->add_flag("--zstd", zstd, "Compress records with zstd");
    command->add_option("--zstd-level", zstd_level, "zstd level")
        ->capture_default_str()
        ->check(CLI::Range(1, 19));
  }
  void add_source_out(CLI::App* command, const std::string& what) {
    command->add_option("source", source, what)->required()->check(CLI::ExistingDirectory);
    command->add_option("out", out, "Output dataset directory")->required();
  }
};

DataCommands::DataCommands(CLI::App& data) : options_(std::make_unique<Options>()) {
  Options& o = *options_;
  o.synth = data.add_subcommand("synth", "Write the deterministic synthetic retrieval dataset");
  data::SynthOptions& s = o.synth_options;
  o.synth->add_option("--out", o.synth_out, "Output directory")->capture_default_str();
  o.synth->add_option("--train", s.num_train, "Training samples")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  o.synth->add_option("--test", s.num_test, "Held-out samples")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  o.synth->add_option("--frames", s.frames, "Frames per video")
      ->capture_default_str()
      ->check(CLI::Range(2, 1024));
  o.synth->add_option("--feature-dim", s.feature_dim, "Per-frame feature size")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  o.synth->add_option("--records-per-shard", s.records_per_shard, "Records per shard file")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  o.synth->add_option("--noise", s.noise, "Gaussian noise std")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  o.synth->add_option("--seed", s.seed, "Generator seed")->capture_default_str();
  o.synth->add_flag("--zstd", s.zstd, "Compress records with zstd");

  CLI::App* import = data.add_subcommand("import", "Import a public dataset layout into shards");
  import->require_subcommand(1);
  o.humanml3d = import->add_subcommand("humanml3d", "HumanML3D (or KIT-ML) → motion shards per split");
  o.add_source_out(o.humanml3d, "HumanML3D root (new_joint_vecs/, texts/, train.txt, Mean.npy, ...)");
  data::HumanML3DImportOptions& h = o.humanml3d_options;
  o.humanml3d->add_option("--feature-dim", h.feature_dim, "Motion feature size (263; 251 for KIT-ML)")
      ->capture_default_str();
  o.humanml3d->add_option("--fps", h.fps, "Frames per second of the features")->capture_default_str();
  o.humanml3d->add_option("--min-length", h.min_length, "Drop samples shorter than this")
      ->capture_default_str();
  o.humanml3d->add_option("--max-length", h.max_length, "Drop samples this long or longer")
      ->capture_default_str();
  o.humanml3d->add_flag("--strict", h.strict, "Missing files and bad caption lines are errors");
  o.add_shard_options(o.humanml3d);

  o.videos = import->add_subcommand("videos",
                                    "Video corpus (features/, keypoints/, captions.tsv) → retrieval shards");
  o.add_source_out(o.videos, "Corpus root (features/<id>.npy, keypoints/<id>.npy, captions.tsv, splits/)");
  data::VideoImportOptions& v = o.video_options;
  o.videos->add_option("--max-frames", v.max_frames, "Frames per video (uniformly sampled)")
      ->capture_default_str();
  o.videos->add_option("--max-text-len", v.max_text_len, "Tokens per caption, padded")->capture_default_str();
  o.videos->add_option("--tokenizer", o.tokenizer, "word | unigram | bpe (trained on the train captions)")
      ->capture_default_str();
  o.videos->add_option("--vocab-size", v.tokenizer.vocab_size, "Tokenizer vocabulary (upper bound)")
      ->capture_default_str();
  o.videos->add_option(
      "--tokenizer-model", v.tokenizer_model,
      "Use this tokenizer instead of training: another import's tokenizer.model (SentencePiece), or "
      "the vocab.txt of one imported with --tokenizer word");
  o.videos->add_option("--test-every", v.test_every, "Without splits/: every n-th video goes to test")
      ->capture_default_str();
  o.videos->add_flag("--strict", v.strict, "Videos missing a file are errors");
  o.add_shard_options(o.videos);

  o.pack = data.add_subcommand("pack", "Rewrite a dataset with another shard size or compression");
  o.add_source_out(o.pack, "Source dataset directory (with manifest.json)");
  o.add_shard_options(o.pack);

  o.verify =
      data.add_subcommand("verify", "Check a dataset's files against its manifest (sizes, counts, xxh3)");
  o.verify->add_option("dir", o.source, "Dataset directory")->required()->check(CLI::ExistingDirectory);
  o.verify->add_flag("--no-hashes", o.skip_hashes, "Check sizes and record counts only");
}

DataCommands::~DataCommands() = default;

std::optional<int> DataCommands::run() const {
  const Options& o = *options_;
  const auto progress = [](uint64_t done, uint64_t total) {
    std::fprintf(stderr, "\r  %llu / %llu", static_cast<unsigned long long>(done),
                 static_cast<unsigned long long>(total));
    if (done == total) std::fprintf(stderr, "\n");
  };
  if (*o.synth) {
    data::write_synthetic_dataset(o.synth_options, o.synth_out);
    const data::SynthOptions& s = o.synth_options;
    std::printf(
        "wrote synthetic dataset to %s: %lld train / %lld test samples, %lld frames, %lld-d features\n",
        o.synth_out.c_str(), static_cast<long long>(s.num_train), static_cast<long long>(s.num_test),
        static_cast<long long>(s.frames), static_cast<long long>(s.feature_dim));
    return 0;
  }
  if (*o.humanml3d) {
    data::HumanML3DImportOptions options = o.humanml3d_options;
    options.writer = o.writer();
    const data::HumanML3DImportReport report = data::import_humanml3d(o.source, o.out, options);
    std::printf("imported HumanML3D %s → %s\n%s\n", o.source.c_str(), o.out.c_str(),
                report.summary().c_str());
    return 0;
  }
  if (*o.videos) {
    data::VideoImportOptions options = o.video_options;
    options.tokenizer.kind = data::tokenizer_kind_from_name(o.tokenizer);
    options.writer = o.writer();
    const data::VideoImportReport report = data::import_videos(o.source, o.out, options);
    std::printf("imported video corpus %s → %s\n%s\n", o.source.c_str(), o.out.c_str(),
                report.summary().c_str());
    return 0;
  }
  if (*o.pack) {
    const data::PackReport r = data::repack_dataset(o.source, o.out, o.writer(), progress);
    std::printf("packed %llu records: %llu shards (%.1f MiB) → %llu shards (%.1f MiB) in %s\n",
                static_cast<unsigned long long>(r.records), static_cast<unsigned long long>(r.shards_in),
                static_cast<double>(r.bytes_in) / (1 << 20), static_cast<unsigned long long>(r.shards_out),
                static_cast<double>(r.bytes_out) / (1 << 20), o.out.c_str());
    return 0;
  }
  if (*o.verify) {
    const data::DatasetManifest manifest = data::read_manifest(o.source);
    data::verify_dataset(manifest, !o.skip_hashes, progress);
    uint64_t records = 0;
    for (const auto& [name, split] : manifest.splits) records += split.records;
    std::printf("dataset %s is intact: kind '%s', %zu splits, %llu records%s\n", o.source.c_str(),
                manifest.kind.c_str(), manifest.splits.size(), static_cast<unsigned long long>(records),
                o.skip_hashes ? " (hashes not checked)" : ", every xxh3 matches");
    return 0;
  }
  return std::nullopt;
}

}  // namespace vimo::trainer
