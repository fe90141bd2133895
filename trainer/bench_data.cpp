// Implements the data loader benchmark of bench_data.h and the `vimo bench data` command.
#include "trainer/bench_data.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <random>
#include <stdexcept>
#include <thread>

#include "data/collate.h"
#include "data/loader.h"
#include "data/manifest.h"
#include "data/shard.h"
#include "data/synthetic.h"
#include "trainer/bench_stats.h"

namespace vimo::trainer {

namespace fs = std::filesystem;

// Note [What the data benchmark compares]: the goal (issue 5) is a StreamingLoader within 0.8x of reading
// the same shard files with plain read(), both from the page cache, so that the loader never costs more than
// the bytes it moves. Between the two ends, the "stage" rows add one step at a time, single-threaded and in
// file order, so the differences between consecutive rows say where the loader's time goes:
//   raw read()           read() of each file in 1 MiB blocks, nothing else (the baseline)
//   raw read() + xxh3    the same with xxh3 over every block (data::file_xxh3): the cost of checksums
//   pread per record     one pread into a freshly allocated buffer per record: syscall + allocation
//   read_record          ShardReader::read_record: + checksum, zstd decode, parse, copy into Field bytes
//   read_view            ShardReader::read_view, the loader's path: the same without the copy, into one
//                        reused buffer
//   read_view+collate    + each record copied into its batch's padded tensors at once (data::Collator over a
//                        TensorPool), as the loader does
//   loader, N workers    the StreamingLoader: + block-shuffled order, LRU shard cache, batch jobs handed
//                        from N prefetch threads (0: read on the caller's thread)
//   ..., 2nd epoch       the same loader's second epoch, timed after an untimed first. A fresh loader pays
//                        the kernel's work of mapping each shard and faulting its pages in (a few ms per
//                        pass of ~80 MB, less for files in large page-cache folios). A training run pays it
//                        once per shard while the split has at most `open_shards` (64) shards and the page
//                        cache holds them: its loader keeps them mapped from epoch to epoch, and this row is
//                        what such an epoch costs. (With more shards the LRU cache closes and maps them
//                        again, like the fresh row.) Both ends of the window follow an epoch's last batch, so
//                        the prefetch queue is in the same state at each; the window's work differs from one
//                        epoch's by at most `prefetch` batches of the epoch's (4 of 64 here).
//   ..., first_read      the same with data.verify = first_read: records hashed in the first epoch are not
//                        hashed again (Note [Verifying a mapped record once] in data/shard_reader.cpp).
//   floor: shuffled ...  not the loader: the least any block-shuffled loader that verifies every read must
//                        do, on as many threads as the largest worker count. Every record of shards kept
//                        mapped, in a random order, is hashed (xxh3) and copied into a 64-record buffer; no
//                        parsing, no collation, no queue. A loader row near it is bound by this machine's
//                        memory, not by the loader (plain shards only).
// No row includes the loader's destruction (unmapping, joining its threads): the window ends at the last
// batch.
// All rows cover the same records and report MB/s of the same shard-file bytes, so the ratios of MB/s and
// of records/s are equal. A zstd dataset moves fewer file bytes for the same records. Each row makes one
// pass per round, and "x raw" is the median over rounds of raw's time / the row's time (Note [Paired
// ratios] in trainer/bench_stats.h).

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

int open_or_throw(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    throw std::runtime_error(fmt::format("bench data: cannot open {}: {}", path, std::strerror(errno)));
  return fd;
}

// Reads exactly `count` bytes at `offset`.
void pread_exactly(int fd, uint64_t offset, uint8_t* out, uint64_t count, const std::string& path) {
  while (count > 0) {
    const ssize_t n = ::pread(fd, out, count, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0)
      throw std::runtime_error(fmt::format("bench data: cannot read {} at offset {}", path, offset));
    out += n;
    offset += static_cast<uint64_t>(n);
    count -= static_cast<uint64_t>(n);
  }
}

PassResult whole_dataset(const BenchDataset& dataset, double seconds) {
  return {dataset.records(), dataset.bytes(), seconds};
}

PassResult xxh3_pass(const BenchDataset& dataset) {
  const auto start = Clock::now();
  for (const std::string& path : dataset.shard_paths()) (void)data::file_xxh3(path);
  return whole_dataset(dataset, seconds_since(start));
}

// The shard format's records start after the 16-byte header and lie back to back.
constexpr uint64_t kFirstRecordOffset = 16;

PassResult pread_per_record_pass(const BenchDataset& dataset) {
  const auto start = Clock::now();
  for (const std::string& path : dataset.shard_paths()) {
    const data::ShardReader reader(path);
    const int fd = open_or_throw(path);
    uint64_t offset = kFirstRecordOffset;
    for (uint64_t i = 0; i < reader.size(); ++i) {
      std::vector<uint8_t> stored(reader.stored_size(i));
      pread_exactly(fd, offset, stored.data(), stored.size(), path);
      offset += stored.size();
    }
    ::close(fd);
  }
  return whole_dataset(dataset, seconds_since(start));
}

PassResult read_record_pass(const BenchDataset& dataset) {
  const auto start = Clock::now();
  for (const std::string& path : dataset.shard_paths()) {
    const data::ShardReader reader(path);
    for (uint64_t i = 0; i < reader.size(); ++i) (void)reader.read_record(i);
  }
  return whole_dataset(dataset, seconds_since(start));
}

// The loader's read path, in file order on one thread: read_view into one reused buffer and view, then (when
// `collate_batch` > 0) each record straight into a Collator over a TensorPool.
PassResult read_view_pass(const BenchDataset& dataset, int64_t collate_batch) {
  data::TensorPool pool(size_t{256} << 20);
  data::RecordBuffer buffer;
  data::RecordView record;
  const auto start = Clock::now();
  std::optional<data::Collator> collator;
  for (const std::string& path : dataset.shard_paths()) {
    const data::ShardReader reader(path);
    for (uint64_t i = 0; i < reader.size(); ++i) {
      reader.read_view(i, buffer, record);
      if (collate_batch == 0) continue;
      if (!collator) collator.emplace(collate_batch, &pool);
      collator->add(record, static_cast<int64_t>(i), {path, static_cast<int64_t>(i)});
      if (collator->size() == collate_batch) {
        (void)collator->finish();
        collator.reset();
      }
    }
  }
  if (collator) (void)collator->finish();
  return whole_dataset(dataset, seconds_since(start));
}

// The "floor" row of Note [What the data benchmark compares]. The mappings, the records' spans and their
// order are made once; each pass splits the order into one contiguous part per thread.
class ShuffledFloor {
 public:
  ShuffledFloor(const BenchDataset& dataset, int threads) : threads_(std::max(threads, 1)) {
    size_t largest = 0;
    for (const std::string& path : dataset.shard_paths()) {
      const data::ShardReader reader(path);
      const size_t size = fs::file_size(path);
      const int fd = open_or_throw(path);
      void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
      ::close(fd);
      if (map == MAP_FAILED)
        throw std::runtime_error(fmt::format("bench data: cannot map {}: {}", path, std::strerror(errno)));
      maps_.push_back({map, size});
      uint64_t offset = kFirstRecordOffset;
      for (uint64_t i = 0; i < reader.size(); ++i) {
        spans_.push_back({static_cast<const uint8_t*>(map) + offset, reader.stored_size(i)});
        offset += reader.stored_size(i);
        largest = std::max<size_t>(largest, reader.stored_size(i));
      }
    }
    std::shuffle(spans_.begin(), spans_.end(), std::mt19937_64(20261124));
    slot_ = largest;
    for (int t = 0; t < threads_; ++t) batches_.emplace_back(kBatch * slot_, uint8_t{1});  // touched
    for (const Span& s : spans_) sink_ ^= XXH3_64bits(s.data, s.size);  // pages mapped, as in a 2nd epoch
  }
  ~ShuffledFloor() {
    for (const auto& [address, size] : maps_) ::munmap(address, size);
  }
  ShuffledFloor(const ShuffledFloor&) = delete;
  ShuffledFloor& operator=(const ShuffledFloor&) = delete;

  PassResult pass(const BenchDataset& dataset) {
    const auto start = Clock::now();
    std::vector<std::thread> pool;
    std::vector<uint64_t> hashes(threads_);
    for (int t = 0; t < threads_; ++t) {
      pool.emplace_back([this, t, &hashes] {
        const size_t begin = spans_.size() * t / threads_, end = spans_.size() * (t + 1) / threads_;
        uint8_t* batch = batches_[t].data();
        uint64_t h = 0;
        for (size_t i = begin; i < end; ++i) {
          h ^= XXH3_64bits(spans_[i].data, spans_[i].size);
          std::memcpy(batch + (i % kBatch) * slot_, spans_[i].data, spans_[i].size);
        }
        hashes[t] = h;
      });
    }
    for (std::thread& thread : pool) thread.join();
    const double seconds = seconds_since(start);
    for (const uint64_t h : hashes) sink_ ^= h;  // the hashes are used, so they are computed
    return whole_dataset(dataset, seconds);
  }
  int threads() const { return threads_; }

 private:
  static constexpr size_t kBatch = 64;
  struct Span {
    const uint8_t* data;
    size_t size;
  };
  int threads_;
  std::vector<std::pair<void*, size_t>> maps_;
  std::vector<Span> spans_;
  size_t slot_ = 0;
  std::vector<std::vector<uint8_t>> batches_;
  uint64_t sink_ = 0;
};

// A row's timed passes: records/s and MB/s from the median, fastest and slowest pass.
nlohmann::json summarize(const std::string& name, const std::vector<double>& seconds,
                         const PassResult& last) {
  const double mid = median(seconds);
  const auto [fastest, slowest] = std::minmax_element(seconds.begin(), seconds.end());
  const double megabytes = static_cast<double>(last.bytes) / 1e6, records = static_cast<double>(last.records);
  return {{"name", name},
          {"records", last.records},
          {"bytes", last.bytes},
          {"seconds", seconds},
          {"records_per_s", records / mid},
          {"mb_per_s", megabytes / mid},
          {"records_per_s_min", records / *slowest},
          {"records_per_s_max", records / *fastest}};
}

struct Contender {
  std::string name;
  std::function<PassResult()> pass;
};

// Runs `repetitions` rounds in which every contender makes one pass, and returns one row each with its
// ratio_to_raw: paired_ratio of the row's records/s to raw's (contenders[0] is raw read()) (Note [Paired
// ratios] in trainer/bench_stats.h). A ratio of throughputs, not of times: a loader pass reads fewer records
// than raw when the last partial batch is dropped (drop_last), and a ratio of times would count that as
// speed.
nlohmann::json measure_side_by_side(int repetitions, const std::vector<Contender>& contenders) {
  const size_t k = contenders.size();
  std::vector<std::vector<double>> seconds(k, std::vector<double>(repetitions)), records_per_s = seconds;
  std::vector<PassResult> last(k);
  for (int r = 0; r < repetitions; ++r) {
    for (size_t j = 0; j < k; ++j) {
      const size_t i = round_order(static_cast<size_t>(r), j, k);
      last[i] = contenders[i].pass();
      seconds[i][r] = last[i].seconds;
      records_per_s[i][r] = last[i].seconds > 0 ? static_cast<double>(last[i].records) / last[i].seconds : 0;
    }
  }
  nlohmann::json rows = nlohmann::json::array();
  for (size_t i = 0; i < k; ++i) {
    nlohmann::json row = summarize(contenders[i].name, seconds[i], last[i]);
    row["ratio_to_raw"] = paired_ratio(records_per_s[i], records_per_s[0]);
    rows.push_back(row);
  }
  return rows;
}

std::string cpu_model() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(std::min(colon + 2, line.size()));
    }
  }
  return "unknown";
}

std::string load_average() {
  std::ifstream loadavg("/proc/loadavg");
  std::string one, five, fifteen;
  loadavg >> one >> five >> fifteen;
  return one + " " + five + " " + fifteen;
}

nlohmann::json bench_one_dataset(const DataBenchOptions& options, bool zstd) {
  const BenchDataset dataset(options, zstd);
  const int reps = options.repetitions;
  (void)raw_read_pass(dataset);  // the page cache now holds every shard file
  std::vector<Contender> contenders = {{"raw read()", [&] { return raw_read_pass(dataset); }}};
  if (options.stages) {
    contenders.push_back({"raw read() + xxh3", [&] { return xxh3_pass(dataset); }});
    contenders.push_back({"pread per record", [&] { return pread_per_record_pass(dataset); }});
    contenders.push_back({"read_record", [&] { return read_record_pass(dataset); }});
    contenders.push_back({"read_view", [&] { return read_view_pass(dataset, 0); }});
    contenders.push_back({fmt::format("read_view + collate {}", options.batch),
                          [&] { return read_view_pass(dataset, options.batch); }});
  }
  std::optional<ShuffledFloor> floor;
  if (options.stages && !zstd) {
    floor.emplace(dataset, options.workers.empty()
                               ? 1
                               : *std::max_element(options.workers.begin(), options.workers.end()));
    contenders.push_back({fmt::format("floor: shuffled xxh3 + copy, {} threads", floor->threads()),
                          [&] { return floor->pass(dataset); }});
  }
  for (const int workers : options.workers) {
    contenders.push_back({fmt::format("loader, {} workers", workers),
                          [&, workers] { return loader_pass(dataset, workers, options.batch); }});
  }
  if (options.later_epoch) {
    for (const int workers : options.workers) {
      contenders.push_back({fmt::format("loader, {} workers, 2nd epoch", workers),
                            [&, workers] { return loader_pass(dataset, workers, options.batch, true); }});
    }
    for (const int workers : options.workers) {
      contenders.push_back({fmt::format("loader, {} workers, 2nd epoch, first_read", workers), [&, workers] {
                              return loader_pass(dataset, workers, options.batch, true,
                                                 data::Verification::FirstRead);
                            }});
    }
  }
  const nlohmann::json rows = measure_side_by_side(reps, contenders);
  return {{"compression", zstd ? "zstd" : "none"},
          {"records", dataset.records()},
          {"shard_bytes", dataset.bytes()},
          {"rows", rows}};
}

}  // namespace

BenchDataset::BenchDataset(const DataBenchOptions& options, bool zstd) {
  static std::atomic<int> serial = 0;
  dir_ = (fs::temp_directory_path() /
          fmt::format("vimo_bench_data_{}_{}_{}", ::getpid(), serial++, zstd ? "zstd" : "plain"))
             .string();
  data::SynthOptions synth;
  synth.num_train = options.records;
  synth.num_test = 1;
  synth.frames = options.frames;
  synth.feature_dim = options.feature_dim;
  synth.records_per_shard = options.records_per_shard;
  synth.zstd = zstd;
  try {
    data::write_synthetic_dataset(synth, dir_);
    const data::DatasetManifest manifest = data::read_manifest(dir_);
    const data::SplitManifest& train = manifest.split("train");
    for (size_t i = 0; i < train.shards.size(); ++i) {
      shard_paths_.push_back(manifest.shard_path("train", i));
      bytes_ += train.shards[i].bytes;
    }
    records_ = static_cast<int64_t>(train.records);
  } catch (...) {
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
    throw;
  }
}

BenchDataset::~BenchDataset() {
  std::error_code ignored;
  fs::remove_all(dir_, ignored);
}

PassResult raw_read_pass(const BenchDataset& dataset) {
  static thread_local std::vector<uint8_t> buffer(1 << 20);
  const auto start = Clock::now();
  uint64_t total = 0;
  for (const std::string& path : dataset.shard_paths()) {
    const int fd = open_or_throw(path);
    while (true) {
      const ssize_t n = ::read(fd, buffer.data(), buffer.size());
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        ::close(fd);
        throw std::runtime_error(fmt::format("bench data: cannot read {}: {}", path, std::strerror(errno)));
      }
      if (n == 0) break;
      total += static_cast<uint64_t>(n);
    }
    ::close(fd);
  }
  const double seconds = seconds_since(start);
  if (total != dataset.bytes()) {
    throw std::runtime_error(fmt::format("bench data: read {} bytes of {} in {}: the dataset changed", total,
                                         dataset.bytes(), dataset.dir()));
  }
  return whole_dataset(dataset, seconds);
}

PassResult loader_pass(const BenchDataset& dataset, int workers, int64_t batch, bool warm_epoch,
                       data::Verification verify) {
  data::LoaderOptions options;
  options.dir = dataset.dir();
  options.global_batch = std::min<int64_t>(batch, dataset.records());
  options.workers = workers;
  options.verify = verify;
  auto start = Clock::now();
  data::StreamingLoader loader(options);
  if (warm_epoch) {
    for (int64_t step = 0; step < loader.batches_per_epoch(); ++step) (void)loader.next();
    start = Clock::now();
  }
  int64_t records = 0;
  for (int64_t step = 0; step < loader.batches_per_epoch(); ++step) {
    const data::LoaderBatch got = loader.next();
    if (warm_epoch && got.epoch != 1) {
      throw std::logic_error(fmt::format("bench data: the timed epoch read a batch of epoch {}", got.epoch));
    }
    records += got.tensors.size();
  }
  const double seconds = seconds_since(start);
  // drop_last leaves out the last partial batch: count only the bytes of the records read.
  const auto bytes =
      static_cast<uint64_t>(static_cast<double>(dataset.bytes()) * static_cast<double>(records) /
                            static_cast<double>(dataset.records()));
  return {records, bytes, seconds};
}

nlohmann::json run_data_bench(const DataBenchOptions& options) {
  if (options.records <= 0 || options.batch <= 0 || options.repetitions <= 0) {
    throw std::runtime_error(
        fmt::format("bench data: records ({}), batch ({}) and repetitions ({}) must be "
                    "positive",
                    options.records, options.batch, options.repetitions));
  }
  nlohmann::json report;
  report["options"] = {{"records", options.records},
                       {"frames", options.frames},
                       {"feature_dim", options.feature_dim},
                       {"records_per_shard", options.records_per_shard},
                       {"batch", options.batch},
                       {"workers", options.workers},
                       {"repetitions", options.repetitions},
                       {"shuffle", true},
                       {"page_cache", "warm"}};
  report["machine"] = {{"nproc", std::thread::hardware_concurrency()},
                       {"cpu", cpu_model()},
                       {"load_average_before", load_average()}};
  report["datasets"] = nlohmann::json::array();
  for (const bool zstd : {false, true}) report["datasets"].push_back(bench_one_dataset(options, zstd));
  report["machine"]["load_average_after"] = load_average();
  if (!options.out.empty()) {
    const fs::path out(options.out);
    if (out.has_parent_path()) fs::create_directories(out.parent_path());
    data::write_file_atomically(options.out, report.dump(2) + "\n");
  }
  return report;
}

void print_data_bench(const nlohmann::json& report) {
  const nlohmann::json& o = report["options"];
  const nlohmann::json& m = report["machine"];
  fmt::print(
      "data loader benchmark: {} records of F={} x Dv={}, batch {}, {} interleaved rounds (median, [min, "
      "max] records/s; x raw: median of the rounds' ratios), page cache warm\n",
      o["records"].get<int64_t>(), o["frames"].get<int64_t>(), o["feature_dim"].get<int64_t>(),
      o["batch"].get<int64_t>(), o["repetitions"].get<int>());
  fmt::print("machine: {} cores, {}, load average {} before, {} after\n", m["nproc"].get<unsigned>(),
             m["cpu"].get<std::string>(), m["load_average_before"].get<std::string>(),
             m["load_average_after"].get<std::string>());
  for (const nlohmann::json& dataset : report["datasets"]) {
    const bool zstd = dataset["compression"].get<std::string>() == "zstd";
    fmt::print("\n{} shards: {:.1f} MB, {:.1f} KB per record\n", zstd ? "zstd" : "plain",
               dataset["shard_bytes"].get<double>() / 1e6,
               dataset["shard_bytes"].get<double>() / dataset["records"].get<double>() / 1e3);
    fmt::print("  {:<40} {:>11} {:>21} {:>9} {:>8}\n", "", "records/s", "[min, max]", "MB/s", "x raw");
    for (const nlohmann::json& row : dataset["rows"]) {
      fmt::print("  {:<40} {:>11.0f} {:>21} {:>9.0f} {:>8.2f}\n", row["name"].get<std::string>(),
                 row["records_per_s"].get<double>(),
                 fmt::format("[{:.0f}, {:.0f}]", row["records_per_s_min"].get<double>(),
                             row["records_per_s_max"].get<double>()),
                 row["mb_per_s"].get<double>(), row["ratio_to_raw"].get<double>());
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// `vimo bench data`

struct BenchCommands::Options {
  CLI::App* data = nullptr;
  DataBenchOptions data_options;
};

BenchCommands::BenchCommands(CLI::App& app) : options_(std::make_unique<Options>()) {
  CLI::App* bench = app.add_subcommand("bench", "Benchmarks that print a table and write a JSON report");
  bench->require_subcommand(1);
  Options& o = *options_;
  DataBenchOptions& d = o.data_options;
  d.out = "runs/bench/data.json";
  o.data = bench->add_subcommand(
      "data", "Data loader throughput against raw read() of the same shard files (page cache warm)");
  o.data->add_option("--out", d.out, "JSON report")->capture_default_str();
  o.data->add_option("--records", d.records, "Records in the synthetic dataset")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  o.data->add_option("--workers", d.workers, "Loader worker counts, one row each (e.g. --workers 0 2)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  o.data->add_option("--batch", d.batch, "Loader batch size")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  o.data->add_option("--repetitions", d.repetitions, "Timed passes per row")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  o.data
      ->add_option("--later-epoch", d.later_epoch,
                   "Also time each loader row's second epoch, its shards mapped already (true/false)")
      ->capture_default_str();
  o.data->add_option("--feature-dim", d.feature_dim, "Per-frame feature size (sets the record size)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
}

BenchCommands::~BenchCommands() = default;

std::optional<int> BenchCommands::run() const {
  const Options& o = *options_;
  if (!*o.data) return std::nullopt;
  const nlohmann::json report = run_data_bench(o.data_options);
  print_data_bench(report);
  if (!o.data_options.out.empty()) fmt::print("\nwrote {}\n", o.data_options.out);
  return 0;
}

}  // namespace vimo::trainer
