// Implements the HumanML3D importer of import_humanml3d.h: caption-line parsing, the sample rules of
// Note [HumanML3D sample rules], and the records written through DatasetWriter.
#include "data/import_humanml3d.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string_view>

#include "data/npy.h"

namespace vimo::data {
namespace {

namespace fs = std::filesystem;

constexpr size_t kMissingNamesShown = 20;
constexpr std::string_view kUtf8ByteOrderMark = "\xef\xbb\xbf";
constexpr double kMaxFps = 1000.0;  // frames per second; motion capture runs at 120 at most

std::string strip(const std::string& s) {
  const char* space = " \t\r\n\v\f";
  const size_t begin = s.find_first_not_of(space);
  if (begin == std::string::npos) return "";
  return s.substr(begin, s.find_last_not_of(space) - begin + 1);
}

// Python's float() for the from/to fields: decimal numbers and nan (any case); we also reject what would
// make int(x * fps) meaningless or a negative Python slice (inf, negative values).
double parse_seconds(const std::string& field, const char* what, const std::string& where) {
  const std::string text = strip(field);
  char* end = nullptr;
  const double value =
      text.empty() || text.find_first_of("xX") != std::string::npos ? 0.0 : std::strtod(text.c_str(), &end);
  if (text.empty() || end != text.c_str() + text.size()) {
    throw std::runtime_error(fmt::format("{}: the '{}' field '{}' is not a number", where, what, field));
  }
  if (std::isnan(value)) return 0.0;  // the loaders read NaN as 0 (whole motion)
  if (std::isinf(value) || value < 0.0 || value > 1e9) {
    throw std::runtime_error(fmt::format(
        "{}: the '{}' field {} is not a time in seconds (must be finite and >= 0)", where, what, field));
  }
  return value;
}

// A motion [T, D] as float32, checked against the expected width.
struct Motion {
  int64_t frames = 0;
  std::vector<float> values;  // [frames, D]
};

bool is_floating(NpyDType dtype) {
  return dtype == NpyDType::Float32 || dtype == NpyDType::Float64 || dtype == NpyDType::Float16;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

Motion read_motion(const std::string& path, int64_t feature_dim) {
  const NpyArray array = read_npy(path);
  if (!is_floating(array.dtype)) {
    throw std::runtime_error(fmt::format("{}: motion features must be floating point ('<f4'), found '{}'",
                                         path, npy_descr(array.dtype)));
  }
  if (array.shape.size() != 2 || array.shape[1] != feature_dim) {
    throw std::runtime_error(
        fmt::format("{}: motion features must have shape [T, {}], found {}. HINT: "
                    "HumanML3D has 263 features per frame, KIT-ML 251 (set feature_dim)",
                    path, feature_dim, shape_text(array.shape)));
  }
  return {array.shape[0], array.to_floats()};
}

enum class Statistic { Mean, StdDev };

std::vector<float> read_statistics(const fs::path& path, int64_t feature_dim, Statistic statistic) {
  if (!fs::exists(path)) {
    throw std::runtime_error(
        fmt::format("{}: missing. HINT: HumanML3D ships Mean.npy and Std.npy at its root "
                    "(the feature statistics of the training set)",
                    path.string()));
  }
  const NpyArray array = read_npy(path.string());
  if (array.shape != std::vector<int64_t>{feature_dim} || !is_floating(array.dtype)) {
    throw std::runtime_error(
        fmt::format("{}: expected a float array ('<f4') of shape [{}], found '{}' of shape {}. HINT: "
                    "HumanML3D's Mean.npy and "
                    "Std.npy hold one value per feature (263, KIT-ML 251: set feature_dim)",
                    path.string(), feature_dim, npy_descr(array.dtype), shape_text(array.shape)));
  }
  std::vector<float> values = array.to_floats();
  // Features are normalized as (x - mean) / std: a zero, negative or non-finite std (or a non-finite mean)
  // turns every sample into inf or NaN at training time, far from this file.
  const bool is_std = statistic == Statistic::StdDev;
  for (size_t i = 0; i < values.size(); ++i) {
    if (!std::isfinite(values[i]) || (is_std && values[i] <= 0.0f)) {
      throw std::runtime_error(fmt::format(
          "{}: element {} is {}; {}. HINT: recompute the statistics of the "
          "training set, or restore the file from the HumanML3D release",
          path.string(), i, values[i],
          is_std ? "every standard deviation must be finite and positive" : "every mean must be finite"));
    }
  }
  return values;
}

// One output sample before it becomes a record.
struct Sample {
  std::string name;
  int64_t begin = 0, end = 0;
  std::vector<const HumanML3DCaption*> captions;
};

Record make_record(int64_t id, const Sample& sample, const Motion& motion, int64_t feature_dim) {
  std::string captions, tokens;
  for (size_t i = 0; i < sample.captions.size(); ++i) {
    captions += (i ? "\n" : "") + sample.captions[i]->caption;
    tokens += (i ? "\n" : "") + sample.captions[i]->tokens;
  }
  const int64_t length = sample.end - sample.begin;
  const std::vector<float> values(motion.values.begin() + sample.begin * feature_dim,
                                  motion.values.begin() + sample.end * feature_dim);
  Record record;
  record.fields.push_back(Field::from_int64s("id", {1}, {id}));
  record.fields.push_back(Field::from_string("name", sample.name));
  record.fields.push_back(Field::from_floats("motion", {length, feature_dim}, values));
  record.fields.push_back(Field::from_string("captions", captions));
  record.fields.push_back(Field::from_string("tokens", tokens));
  record.fields.push_back(Field::from_int64s("length", {1}, {length}));
  record.fields.push_back(Field::from_int64s("range", {2}, {sample.begin, sample.end}));
  return record;
}

void check_options(const HumanML3DImportOptions& o) {
  auto require = [](bool ok, const std::string& what) {
    if (!ok) throw std::runtime_error("HumanML3D import options: " + what);
  };
  require(!o.splits.empty(), "splits must name at least one split file (train, val, test)");
  require(o.feature_dim > 0, fmt::format("feature_dim must be positive, found {}", o.feature_dim));
  // from/to are at most 1e9 s (parse_seconds), so int(to * fps) stays far inside int64 up to this rate.
  require(o.fps > 0 && o.fps <= kMaxFps, fmt::format("fps must be in (0, {}], found {}", kMaxFps, o.fps));
  require(o.min_length >= 1 && o.min_length < o.max_length,
          fmt::format("need 1 <= min_length < max_length, found {} and {}", o.min_length, o.max_length));
}

// Where a motion name was first listed, across all split files.
struct Listing {
  std::string split, where;  // "train", "SRC/train.txt:12"
};

// Imports one split's names; appends records to `writer` and counts everything in `report`. `listed` holds
// the names of the splits imported before: a motion in two splits would be trained on and evaluated on.
void import_split(const fs::path& source, const std::string& split, const HumanML3DImportOptions& options,
                  DatasetWriter& writer, std::map<std::string, Listing>& listed,
                  HumanML3DSplitReport& report) {
  const fs::path split_file = source / (split + ".txt");
  int64_t next_id = 0;
  for (const NumberedLine& line : read_trimmed_lines(split_file.string())) {
    const std::string& name = line.text;
    const std::string where = fmt::format("{}:{}", split_file.string(), line.number);
    check_file_stem(name, "motion name", where);
    const auto [it, fresh] = listed.emplace(name, Listing{split, where});
    if (!fresh && it->second.split == split) {
      ++report.duplicate_names;
      continue;
    }
    if (!fresh) {
      throw std::runtime_error(
          fmt::format("{}: motion '{}' is already listed at {}. HINT: a motion belongs to one split; remove "
                      "one of the two lines",
                      where, name, it->second.where));
    }
    ++report.names;
    const fs::path motion_path = source / "new_joint_vecs" / (name + ".npy");
    const fs::path text_path = source / "texts" / (name + ".txt");
    const bool has_motion = fs::exists(motion_path), has_text = fs::exists(text_path);
    if (!has_motion || !has_text) {
      const fs::path& absent = has_motion ? text_path : motion_path;
      if (options.strict) {
        throw std::runtime_error(
            fmt::format("{}: '{}' is listed but {} does not exist. HINT: the download "
                        "is incomplete; unset strict to skip (and count) such names",
                        where, name, absent.string()));
      }
      ++(has_motion ? report.missing_text : report.missing_motion);
      if (report.missing_names.size() < kMissingNamesShown) report.missing_names.push_back(name);
      continue;
    }
    const Motion motion = read_motion(motion_path.string(), options.feature_dim);
    if (motion.frames < options.min_length) {
      ++report.motions_too_short;
      continue;
    }
    if (motion.frames >= options.max_length) {
      ++report.motions_too_long;
      continue;
    }

    std::vector<HumanML3DCaption> captions;
    for (const NumberedLine& text_line : read_trimmed_lines(text_path.string())) {
      const std::string where = fmt::format("{}:{}", text_path.string(), text_line.number);
      try {
        captions.push_back(parse_humanml3d_caption(text_line.text, where));
      } catch (const std::runtime_error&) {
        if (options.strict) throw;
        ++report.bad_caption_lines;
      }
    }
    Sample whole{name, 0, motion.frames, {}};
    std::vector<Sample> segments;
    for (const HumanML3DCaption& caption : captions) {
      if (caption.from == 0.0 && caption.to == 0.0) {
        whole.captions.push_back(&caption);
        continue;
      }
      // Python: motion[int(f_tag * 20) : int(to_tag * 20)] (int() truncates; the slice clamps to [0, T]).
      const int64_t begin = std::min(static_cast<int64_t>(caption.from * options.fps), motion.frames);
      const int64_t end =
          std::max(begin, std::min(static_cast<int64_t>(caption.to * options.fps), motion.frames));
      if (end - begin < options.min_length) {
        ++report.segments_too_short;
      } else if (end - begin >= options.max_length) {
        ++report.segments_too_long;
      } else {
        segments.push_back({fmt::format("{}[{}:{}]", name, begin, end), begin, end, {&caption}});
      }
    }
    if (whole.captions.empty() && segments.empty()) ++report.motions_without_samples;
    if (!whole.captions.empty()) {
      writer.append(split, make_record(next_id++, whole, motion, options.feature_dim));
      ++report.whole_samples;
      report.captions += static_cast<int64_t>(whole.captions.size());
    }
    for (const Sample& segment : segments) {
      writer.append(split, make_record(next_id++, segment, motion, options.feature_dim));
      ++report.segment_samples;
      ++report.captions;
    }
  }
}

nlohmann::json report_json(const HumanML3DSplitReport& r) {
  return {{"names", r.names},
          {"duplicate_names", r.duplicate_names},
          {"missing_motion", r.missing_motion},
          {"missing_text", r.missing_text},
          {"motions_too_short", r.motions_too_short},
          {"motions_too_long", r.motions_too_long},
          {"segments_too_short", r.segments_too_short},
          {"segments_too_long", r.segments_too_long},
          {"bad_caption_lines", r.bad_caption_lines},
          {"motions_without_samples", r.motions_without_samples},
          {"whole_samples", r.whole_samples},
          {"segment_samples", r.segment_samples},
          {"captions", r.captions},
          {"missing_names", r.missing_names}};
}

}  // namespace

std::vector<NumberedLine> read_trimmed_lines(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error(fmt::format("{}: cannot open for reading", path));
  std::vector<NumberedLine> lines;
  std::string line;
  for (int64_t number = 1; std::getline(file, line); ++number) {
    if (number == 1 && line.rfind(kUtf8ByteOrderMark, 0) == 0) line.erase(0, kUtf8ByteOrderMark.size());
    std::string text = strip(line);
    if (!text.empty()) lines.push_back({number, std::move(text)});
  }
  if (file.bad()) throw std::runtime_error(fmt::format("{}: read error", path));
  return lines;
}

void check_file_stem(const std::string& stem, const std::string& what, const std::string& where) {
  if (stem.empty() || stem == "." || stem == ".." || stem.find('/') != std::string::npos ||
      stem.find('\0') != std::string::npos) {
    throw std::runtime_error(fmt::format("{}: invalid {} '{}' ({}s are file stems: no '/', not '.' or '..')",
                                         where, what, stem, what));
  }
}

HumanML3DCaption parse_humanml3d_caption(const std::string& line, const std::string& where) {
  std::vector<std::string> fields;
  size_t start = 0;
  for (size_t hash; (hash = line.find('#', start)) != std::string::npos; start = hash + 1) {
    fields.push_back(line.substr(start, hash - start));
  }
  fields.push_back(line.substr(start));
  if (fields.size() < 4) {
    throw std::runtime_error(
        fmt::format("{}: expected 'caption#tokens#from#to', found {} '#'-separated "
                    "field(s) in '{}'",
                    where, fields.size(), line));
  }
  const size_t n = fields.size();
  HumanML3DCaption caption;
  for (size_t i = 0; i + 3 < n; ++i) caption.caption += (i ? "#" : "") + fields[i];
  caption.tokens = fields[n - 3];
  caption.from = parse_seconds(fields[n - 2], "from", where);
  caption.to = parse_seconds(fields[n - 1], "to", where);
  return caption;
}

std::string HumanML3DImportReport::summary() const {
  std::string out;
  for (const auto& [split, r] : splits) {
    out += fmt::format(
        "{}: {} records ({} whole motions, {} segments, {} captions) from {} names; dropped {} short / {} "
        "long "
        "motions, {} short / {} long segments; missing {} motions, {} texts{}; {} unparsable caption lines, "
        "{} duplicate names\n",
        split, r.records(), r.whole_samples, r.segment_samples, r.captions, r.names, r.motions_too_short,
        r.motions_too_long, r.segments_too_short, r.segments_too_long, r.missing_motion, r.missing_text,
        r.missing_names.empty() ? "" : fmt::format(" (e.g. {})", fmt::join(r.missing_names, ", ")),
        r.bad_caption_lines, r.duplicate_names);
  }
  return out;
}

HumanML3DImportReport import_humanml3d(const std::string& source, const std::string& out,
                                       const HumanML3DImportOptions& options) {
  check_options(options);
  const fs::path root(source);
  if (!fs::is_directory(root / "new_joint_vecs") || !fs::is_directory(root / "texts")) {
    throw std::runtime_error(
        fmt::format("{}: not a HumanML3D directory (new_joint_vecs/ and texts/ are "
                    "required). HINT: point at the folder holding new_joint_vecs/, "
                    "texts/, train.txt and Mean.npy",
                    source));
  }
  for (const std::string& split : options.splits) {
    if (!fs::exists(root / (split + ".txt"))) {
      throw std::runtime_error(
          fmt::format("{}: split file missing. HINT: set the import's splits to the "
                      "split files present",
                      (root / (split + ".txt")).string()));
    }
  }
  const std::vector<float> mean = read_statistics(root / "Mean.npy", options.feature_dim, Statistic::Mean);
  const std::vector<float> std_dev =
      read_statistics(root / "Std.npy", options.feature_dim, Statistic::StdDev);

  DatasetWriter writer(out, "motion", options.writer);
  HumanML3DImportReport report;
  std::map<std::string, Listing> listed;
  for (const std::string& split : options.splits) {
    import_split(root, split, options, writer, listed, report.splits[split]);
  }
  writer.add_file("mean.npy", npy_bytes({options.feature_dim}, mean));
  writer.add_file("std.npy", npy_bytes({options.feature_dim}, std_dev));
  nlohmann::json counts = nlohmann::json::object();
  for (const auto& [split, r] : report.splits) counts[split] = report_json(r);
  writer.set_metadata("humanml3d", {{"source", source},
                                    {"feature_dim", options.feature_dim},
                                    {"fps", options.fps},
                                    {"min_length", options.min_length},
                                    {"max_length", options.max_length},
                                    {"strict", options.strict},
                                    {"report", counts}});
  writer.set_metadata("feature_dim", options.feature_dim);
  writer.finish();
  return report;
}

}  // namespace vimo::data
