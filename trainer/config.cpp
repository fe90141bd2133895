// Implements trainer/config.h: one table of fields (Note [One table of fields]) drives loading a YAML file,
// applying `key.path=value` overrides, naming known keys in errors, range checks and rendering to YAML.
#include "trainer/config.h"

#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>

namespace vimo::trainer {
namespace {

// Note [One table of fields]
// Every config key is declared once, in fields_of(): its section, its name, the member it sets and the rule
// its value must satisfy. Loading a file, applying an override, listing the known keys in an error, checking
// ranges in validate() and rendering to_yaml() all walk that table, so a new field is one struct member plus
// one line there. The table's order is the order of to_yaml(). Rules that relate two fields (heads divides
// width) are not per-field; validate() checks them after everything is set.

struct Bound {
  double value;
  bool inclusive;
};

// What a value must satisfy beyond its type: numeric bounds, or for strings a set of choices or
// non-emptiness.
struct Rule {
  std::optional<Bound> low;
  std::optional<Bound> high;
  std::vector<std::string_view> choices;
  bool non_empty = false;
};

Rule any_value() { return {}; }
Rule greater_than(double low) { return {Bound{low, false}, std::nullopt, {}, false}; }
Rule at_least(double low) { return {Bound{low, true}, std::nullopt, {}, false}; }
Rule zero_to_one(bool one_allowed) { return {Bound{0, true}, Bound{1, one_allowed}, {}, false}; }
Rule between(double low, double high) { return {Bound{low, true}, Bound{high, true}, {}, false}; }
Rule one_of(std::vector<std::string_view> choices) {
  return {std::nullopt, std::nullopt, std::move(choices), false};
}
Rule non_empty() { return {std::nullopt, std::nullopt, {}, true}; }

// The member a field sets. A bool reads true/false.
using Target = std::variant<int64_t*, uint64_t*, double*, bool*, std::string*>;

struct Field {
  std::string_view section;
  std::string_view key;
  Target target;  // the member of the Config that fields_of() was given
  Rule rule;

  std::string path() const { return fmt::format("{}.{}", section, key); }
};

// The table of Note [One table of fields], pointing into `c`.
std::vector<Field> fields_of(Config& c) {
  ModelConfig& m = c.model;
  DataConfig& d = c.data;
  OptimConfig& o = c.optim;
  TrainConfig& t = c.train;
  const Rule count = at_least(1);
  const Rule non_negative = at_least(0);
  const Rule positive = greater_than(0);
  // Values the code narrows to int (thread and queue counts), bounded far below where that would wrap.
  const Rule small_count = between(0, 4096);
  // exp(logit scale) must stay a sane float32 (e^88 overflows); CLIP caps it at ln 100 ≈ 4.6.
  const Rule log_scale = between(-10, 10);
  return {
      {"model", "vocab_size", &m.vocab_size, count},
      {"model", "max_text_len", &m.max_text_len, count},
      {"model", "frames", &m.frames, count},
      {"model", "feature_dim", &m.feature_dim, count},
      {"model", "joints", &m.joints, count},
      {"model", "embed_dim", &m.embed_dim, count},
      {"model", "width", &m.width, count},
      {"model", "heads", &m.heads, count},
      {"model", "text_layers", &m.text_layers, count},
      {"model", "video_layers", &m.video_layers, count},
      {"model", "keypoint_width", &m.keypoint_width, count},
      {"model", "spatio_temporal_layers", &m.spatio_temporal_layers, count},
      {"model", "temporal_layers", &m.temporal_layers, count},
      {"model", "action_scale", &m.action_scale, Rule{Bound{0, false}, Bound{1e4, true}, {}, false}},
      {"model", "logit_scale_init", &m.logit_scale_init, log_scale},
      {"model", "logit_scale_max", &m.logit_scale_max, log_scale},
      {"data", "dir", &d.dir, non_empty()},
      {"data", "global_batch", &d.global_batch, count},
      {"data", "seed", &d.seed, any_value()},
      {"data", "shuffle_block", &d.shuffle_block, count},
      {"data", "workers", &d.workers, small_count},
      {"data", "prefetch", &d.prefetch, small_count},
      {"data", "skip_corrupt", &d.skip_corrupt, any_value()},
      {"data", "verify", &d.verify, one_of({"every_read", "first_read"})},
      {"data", "drop_last", &d.drop_last, any_value()},
      {"data", "open_shards", &d.open_shards, count},
      {"optim", "lr", &o.lr, positive},
      {"optim", "min_lr_ratio", &o.min_lr_ratio, zero_to_one(true)},
      {"optim", "warmup_steps", &o.warmup_steps, non_negative},
      {"optim", "weight_decay", &o.weight_decay, non_negative},
      {"optim", "beta1", &o.beta1, zero_to_one(false)},
      {"optim", "beta2", &o.beta2, zero_to_one(false)},
      {"optim", "eps", &o.eps, positive},
      {"optim", "grad_clip", &o.grad_clip, non_negative},
      {"optim", "zero_stage", &o.zero_stage, zero_to_one(true)},
      {"train", "stage", &t.stage, one_of({"action", "object", "router"})},
      {"train", "steps", &t.steps, count},
      {"train", "log_every", &t.log_every, count},
      {"train", "eval_every", &t.eval_every, non_negative},
      {"train", "checkpoint_every", &t.checkpoint_every, count},
      {"train", "keep_checkpoints", &t.keep_checkpoints, count},
      {"train", "stop_after", &t.stop_after, non_negative},
      {"train", "out_dir", &t.out_dir, non_empty()},
      {"train", "init_from", &t.init_from, any_value()},
      {"train", "threads", &t.threads, between(1, 4096)},
      {"train", "seed", &t.seed, any_value()},
      {"train", "bucket_mib", &t.bucket_mib, positive},
      {"train", "first_bucket_mib", &t.first_bucket_mib, positive},
      {"train", "shared_memory_allreduce", &t.shared_memory_allreduce, any_value()},
      // Seconds, turned into int64 milliseconds: a day at most.
      {"train", "watchdog_timeout_s", &t.watchdog_timeout_s, between(0, 86400)},
      {"train", "heartbeat_s", &t.heartbeat_s, between(0.001, 3600)},
  };
}

std::string join(const std::vector<std::string_view>& words) {
  std::string text;
  for (std::string_view word : words) text += fmt::format("{}{}", text.empty() ? "" : ", ", word);
  return text;
}

std::vector<std::string_view> sections_of(const std::vector<Field>& fields) {
  std::vector<std::string_view> sections;
  for (const Field& field : fields) {
    if (sections.empty() || sections.back() != field.section) sections.push_back(field.section);
  }
  return sections;
}

// The keys of `section`; empty when there is no such section.
std::vector<std::string_view> keys_of(const std::vector<Field>& fields, std::string_view section) {
  std::vector<std::string_view> keys;
  for (const Field& field : fields) {
    if (field.section == section) keys.push_back(field.key);
  }
  return keys;
}

const Field* find_field(const std::vector<Field>& fields, std::string_view section, std::string_view key) {
  for (const Field& field : fields) {
    if (field.section == section && field.key == key) return &field;
  }
  return nullptr;
}

// ---- Scalars: parsing, naming and printing each field type ----

template <typename T>
std::string type_name() {
  if constexpr (std::is_same_v<T, std::string>) {
    return "a string";
  } else if constexpr (std::is_same_v<T, bool>) {
    return "true or false";
  } else if constexpr (std::is_same_v<T, double>) {
    return "a number";
  } else if constexpr (std::is_unsigned_v<T>) {
    return "a non-negative integer";
  } else {
    return "an integer";
  }
}

// The whole text as a T, or nothing: "12abc" is not an integer, "1.5" is not an integer, "nan" is no number.
template <typename T>
std::optional<T> parse_scalar(std::string_view text) {
  if constexpr (std::is_same_v<T, std::string>) {
    return std::string(text);
  } else if constexpr (std::is_same_v<T, bool>) {
    if (text == "true" || text == "True" || text == "TRUE") return true;
    if (text == "false" || text == "False" || text == "FALSE") return false;
    return std::nullopt;
  } else {
    // YAML allows a leading '+'; std::from_chars does not (and must not see "+-1").
    if (text.size() > 1 && text[0] == '+' && text[1] != '-' && text[1] != '+') text.remove_prefix(1);
    T value{};
    const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (error != std::errc() || end != text.data() + text.size()) return std::nullopt;
    if constexpr (std::is_floating_point_v<T>) {
      if (!std::isfinite(value)) return std::nullopt;
    }
    return value;
  }
}

// The value as to_yaml() writes it: doubles in the shortest form that parses back to the same bits.
template <typename T>
std::string format_value(const T& value) {
  if constexpr (std::is_same_v<T, std::string>) {
    return value;
  } else if constexpr (std::is_same_v<T, bool>) {
    return value ? "true" : "false";
  } else {
    std::array<char, 64> text{};
    const auto [end, error] = std::to_chars(text.data(), text.data() + text.size(), value);
    return std::string(text.data(), end);
  }
}

// What a T satisfying `rule` is, for "expected ..." in errors: "a number > 0", "one of action, object".
template <typename T>
std::string describe_rule(const Rule& rule) {
  if (!rule.choices.empty()) return "one of " + join(rule.choices);
  if (rule.non_empty) return "a non-empty string";
  const auto bracket = [](const Bound& bound, char open, char closed) {
    return bound.inclusive ? closed : open;
  };
  if (rule.low && rule.high) {  // every rule with an upper bound has a lower one
    return fmt::format("{} in {}{}, {}{}", type_name<T>(), bracket(*rule.low, '(', '['),
                       format_value(rule.low->value), format_value(rule.high->value),
                       bracket(*rule.high, ')', ']'));
  }
  if (rule.low) {
    return fmt::format("{} {} {}", type_name<T>(), rule.low->inclusive ? ">=" : ">",
                       format_value(rule.low->value));
  }
  return type_name<T>();
}

template <typename T>
bool satisfies(const Rule& rule, const T& value) {
  if constexpr (std::is_same_v<T, std::string>) {
    if (rule.non_empty && value.empty()) return false;
    return rule.choices.empty() ||
           std::find(rule.choices.begin(), rule.choices.end(), value) != rule.choices.end();
  } else if constexpr (std::is_same_v<T, bool>) {
    return true;
  } else {
    const auto v = static_cast<double>(value);  // bounds are small numbers, exact as doubles
    if (rule.low && (rule.low->inclusive ? v < rule.low->value : v <= rule.low->value)) return false;
    if (rule.high && (rule.high->inclusive ? v > rule.high->value : v >= rule.high->value)) return false;
    return true;
  }
}

std::string in_quotes(std::string_view text) { return fmt::format("'{}'", text); }

// A YAML value as "found ..." in errors.
std::string describe_node(const YAML::Node& node) {
  if (node.IsScalar()) return in_quotes(node.Scalar());
  if (node.IsNull()) return "an empty value";
  if (node.IsSequence()) return "a list";
  if (node.IsMap()) return "a map";
  return "nothing";
}

// `where` is "file:line", "override 'k=v'" or validate()'s source.
[[noreturn]] void fail_expected(const std::string& where, const Field& field, const std::string& expected,
                                const std::string& found) {
  throw ConfigError(fmt::format("{}: {}: expected {}, found {}", where, field.path(), expected, found));
}

// Parses `node` as the field's type, checks the field's rule and stores the value.
void set_field(const Field& field, const YAML::Node& node, const std::string& where) {
  std::visit(
      [&](auto* target) {
        using T = std::remove_pointer_t<decltype(target)>;
        // An empty value (`init_from:`) is an empty string, and nothing else.
        const bool scalar = node.IsScalar() || (std::is_same_v<T, std::string> && node.IsNull());
        const std::optional<T> value = scalar ? parse_scalar<T>(node.Scalar()) : std::nullopt;
        if (!value) fail_expected(where, field, type_name<T>(), describe_node(node));
        if (!satisfies(field.rule, *value)) {
          fail_expected(where, field, describe_rule<T>(field.rule), in_quotes(node.Scalar()));
        }
        *target = *value;
      },
      field.target);
}

// ---- Unknown keys ----

// Optimal string alignment distance: edits, where swapping two neighbours ("trian") is one edit.
size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<std::vector<size_t>> d(a.size() + 1, std::vector<size_t>(b.size() + 1));
  for (size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    for (size_t j = 1; j <= b.size(); ++j) {
      d[i][j] =
          std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) {
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
      }
    }
  }
  return d[a.size()][b.size()];
}

// The key the user probably meant by `section.key` (by a top-level `section` when `key` is empty): the
// closest section or key path within a typo's reach, where a key in another section costs one edit more.
std::optional<std::string> probably_meant(const std::vector<Field>& fields, std::string_view section,
                                          std::string_view key) {
  const std::string_view word = key.empty() ? section : key;
  size_t best = 2 + word.size() / 4;  // one more than the edits a typo may have
  std::optional<std::string> meant;
  const auto consider = [&](size_t distance, std::string candidate) {
    if (distance < best) {
      best = distance;
      meant = std::move(candidate);
    }
  };
  if (key.empty()) {
    for (std::string_view known : sections_of(fields)) {
      consider(edit_distance(section, known), std::string(known));
    }
  }
  for (const Field& field : fields) {
    consider(edit_distance(word, field.key) + (key.empty() || field.section != section ? 1 : 0),
             field.path());
  }
  return meant;
}

// "unknown key 'optim.lrr' (known keys in 'optim': lr, ...); did you mean 'optim.lr'?"
std::string unknown_key_message(const std::vector<Field>& fields, std::string_view section,
                                std::string_view key) {
  const std::string path = key.empty() ? std::string(section) : fmt::format("{}.{}", section, key);
  const std::vector<std::string_view> keys = keys_of(fields, section);
  std::string message =
      keys.empty() ? fmt::format("unknown key '{}' (known sections: {})", path, join(sections_of(fields)))
                   : fmt::format("unknown key '{}' (known keys in '{}': {})", path, section, join(keys));
  if (const auto meant = probably_meant(fields, section, key)) {
    message += fmt::format("; did you mean '{}'?", *meant);
  }
  return message;
}

// ---- Sources: the file, then the overrides ----

YAML::Node read_yaml_file(const std::string& path) {
  std::error_code error;
  if (!std::filesystem::is_regular_file(path, error)) {
    if (std::filesystem::exists(path, error)) {
      throw ConfigError(fmt::format("config file '{}' is not a file", path));
    }
    throw ConfigError(fmt::format("config file '{}' not found (relative paths start at {})", path,
                                  std::filesystem::current_path(error).string()));
  }
  std::ifstream in(path);
  if (!in) throw ConfigError(fmt::format("config file '{}' cannot be read", path));
  try {
    // Every document is parsed, so that nothing after a `---` or `...` goes unread and unchecked.
    std::vector<YAML::Node> documents = YAML::LoadAll(in);
    // An empty document (a trailing `---`) holds nothing to read.
    documents.erase(std::remove_if(documents.begin(), documents.end(),
                                   [](const YAML::Node& node) { return node.IsNull(); }),
                    documents.end());
    if (documents.size() > 1) {
      throw ConfigError(
          fmt::format("{}: holds {} YAML documents (separated by --- or ...); a config is one. "
                      "HINT: merge them, or keep the others in files of their own",
                      path, documents.size()));
    }
    return documents.empty() ? YAML::Node() : documents.front();
  } catch (const YAML::Exception& e) {
    if (e.mark.is_null()) throw ConfigError(fmt::format("{}: invalid YAML: {}", path, e.msg));
    throw ConfigError(fmt::format("{}:{}: invalid YAML: {}", path, e.mark.line + 1, e.msg));
  }
}

void apply_file(const YAML::Node& root, const std::vector<Field>& fields, const std::string& path) {
  // Errors point at the key's line: a value's own mark can be the next line (`lr:` with nothing after it).
  const auto where = [&](const YAML::Node& node) { return fmt::format("{}:{}", path, node.Mark().line + 1); };
  if (root.IsNull()) return;  // an empty file: every default
  if (!root.IsMap()) {
    throw ConfigError(fmt::format("{}: expected a map of sections ({}), found {}", where(root),
                                  join(sections_of(fields)), describe_node(root)));
  }
  std::map<std::string, int> first_line;  // key path -> line where it was first set
  const auto check_unique = [&](const std::string& key_path, const YAML::Node& key) {
    const auto [first, inserted] = first_line.emplace(key_path, key.Mark().line + 1);
    if (!inserted) {
      throw ConfigError(
          fmt::format("{}: duplicate key '{}' (first set on line {})", where(key), key_path, first->second));
    }
  };
  for (const auto& section_entry : root) {
    const std::string section = section_entry.first.Scalar();
    const std::vector<std::string_view> keys = keys_of(fields, section);
    if (keys.empty()) {
      throw ConfigError(
          fmt::format("{}: {}", where(section_entry.first), unknown_key_message(fields, section, "")));
    }
    check_unique(section, section_entry.first);
    const YAML::Node& entries = section_entry.second;
    if (entries.IsNull()) continue;  // `model:` with nothing under it
    if (!entries.IsMap()) {
      throw ConfigError(fmt::format("{}: {}: expected a map of keys ({}), found {}",
                                    where(section_entry.first), section, join(keys), describe_node(entries)));
    }
    for (const auto& entry : entries) {
      const Field* field = find_field(fields, section, entry.first.Scalar());
      if (field == nullptr) {
        throw ConfigError(fmt::format("{}: {}", where(entry.first),
                                      unknown_key_message(fields, section, entry.first.Scalar())));
      }
      check_unique(field->path(), entry.first);
      set_field(*field, entry.second, where(entry.first));
    }
  }
}

std::string trimmed(std::string_view text) {
  const size_t begin = text.find_first_not_of(" \t");
  if (begin == std::string_view::npos) return "";
  return std::string(text.substr(begin, text.find_last_not_of(" \t") - begin + 1));
}

// Applies "section.key=value"; the value is read as YAML, so `train.init_from=` sets an empty string.
void apply_override(const std::string& text, const std::vector<Field>& fields) {
  const std::string where = fmt::format("override '{}'", text);
  const size_t equals = text.find('=');
  const std::string key_path =
      equals == std::string::npos ? "" : trimmed(std::string_view(text).substr(0, equals));
  if (key_path.empty()) {
    throw ConfigError(fmt::format("{}: expected key.path=value, e.g. optim.lr=3e-4", where));
  }
  const size_t dot = key_path.find('.');
  const std::string section = key_path.substr(0, dot);
  const std::string key = dot == std::string::npos ? "" : key_path.substr(dot + 1);
  const Field* field = find_field(fields, section, key);
  if (field == nullptr) {
    const std::vector<std::string_view> keys = keys_of(fields, section);
    if (key.empty() && !keys.empty()) {
      throw ConfigError(fmt::format("{}: '{}' is a section, not a key (known keys in '{}': {})", where,
                                    section, section, join(keys)));
    }
    throw ConfigError(fmt::format("{}: {}", where, unknown_key_message(fields, section, key)));
  }
  YAML::Node value;
  try {
    value = YAML::Load(text.substr(equals + 1));
  } catch (const YAML::Exception& e) {
    throw ConfigError(fmt::format("{}: {}: the value is not valid YAML: {}", where, key_path, e.msg));
  }
  set_field(*field, value, where);
}

[[noreturn]] void fail_cross_field(const std::string& source, std::string_view first_key,
                                   const std::string& first, std::string_view relation,
                                   std::string_view second_key, const std::string& second) {
  throw ConfigError(
      fmt::format("{}: {} ({}) {} {} ({})", source, first_key, first, relation, second_key, second));
}

void require_divides(const std::string& source, std::string_view divisor_key, int64_t divisor,
                     std::string_view dividend_key, int64_t dividend) {
  if (dividend % divisor != 0) {
    fail_cross_field(source, divisor_key, format_value(divisor), "must divide", dividend_key,
                     format_value(dividend));
  }
}

template <typename T>
void require_at_most(const std::string& source, std::string_view small_key, T small,
                     std::string_view large_key, T large) {
  if (small > large) {
    fail_cross_field(source, small_key, format_value(small), "must be <=", large_key, format_value(large));
  }
}

}  // namespace

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  const YAML::Node root = read_yaml_file(path);
  Config config;
  const std::vector<Field> fields = fields_of(config);
  apply_file(root, fields, path);
  for (const std::string& override_text : overrides) apply_override(override_text, fields);
  // A rule that relates two keys can fail because of an override as much as because of the file: name both.
  std::string source = path;
  for (size_t i = 0; i < overrides.size(); ++i) {
    source += fmt::format("{}'{}'", i == 0 ? " with override " : ", ", overrides[i]);
  }
  validate(config, source);
  return config;
}

void validate(const Config& config, const std::string& source) {
  // The table points into a Config it could write; reading through a copy keeps `config` const.
  Config copy = config;
  for (const Field& field : fields_of(copy)) {
    std::visit(
        [&](auto* value) {
          using T = std::remove_pointer_t<decltype(value)>;
          if (!satisfies(field.rule, *value)) {
            fail_expected(source, field, describe_rule<T>(field.rule), in_quotes(format_value(*value)));
          }
        },
        field.target);
  }
  // Every count is >= 1 by now, so the divisions below are safe.
  const ModelConfig& model = config.model;
  require_divides(source, "model.heads", model.heads, "model.width", model.width);
  require_divides(source, "model.heads", model.heads, "model.keypoint_width", model.keypoint_width);
  // The action branch's temporal transformer runs at the embedding width (DESIGN.md, Gemini-MVR).
  require_divides(source, "model.heads", model.heads, "model.embed_dim", model.embed_dim);
  require_at_most(source, "model.logit_scale_init", model.logit_scale_init, "model.logit_scale_max",
                  model.logit_scale_max);
  require_at_most(source, "train.stop_after", config.train.stop_after, "train.steps", config.train.steps);
  if (config.train.watchdog_timeout_s > 0 && config.train.heartbeat_s >= config.train.watchdog_timeout_s) {
    throw ConfigError(
        fmt::format("{}: train.heartbeat_s ({}) must be < train.watchdog_timeout_s ({}): a rank is "
                    "declared missing after that many seconds without a heartbeat. HINT: a "
                    "timeout of several heartbeats, or train.watchdog_timeout_s=0 for no watchdog",
                    source, config.train.heartbeat_s, config.train.watchdog_timeout_s));
  }
  require_at_most(source, "optim.warmup_steps", config.optim.warmup_steps, "train.steps", config.train.steps);
}

std::string to_yaml(const Config& config) {
  Config copy = config;  // as in validate()
  YAML::Emitter out;
  out << YAML::BeginMap;
  std::string_view section;
  for (const Field& field : fields_of(copy)) {
    if (field.section != section) {
      if (!section.empty()) out << YAML::EndMap;
      section = field.section;
      out << YAML::Key << std::string(section) << YAML::Value << YAML::BeginMap;
    }
    // Numbers go out as the text format_value() chose; strings are quoted by the emitter where YAML needs it.
    const std::string value = std::visit([](auto* target) { return format_value(*target); }, field.target);
    out << YAML::Key << std::string(field.key) << YAML::Value << value;
  }
  out << YAML::EndMap << YAML::EndMap;
  return out.c_str();
}

}  // namespace vimo::trainer
