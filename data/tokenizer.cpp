// Implements the caption tokenizer of tokenizer.h over SentencePiece (training, loading, encoding) and a
// plain word vocabulary.
#include "data/tokenizer.h"

#include <fmt/format.h>
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <algorithm>
#include <cctype>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string_view>
#include <unordered_map>

// Exported by libsentencepiece (0.1.97) but not declared in its public headers.
namespace sentencepiece::logging {
int GetMinLogLevel();
void SetMinLogLevel(int level);
}  // namespace sentencepiece::logging

namespace vimo::data {
namespace {

constexpr const char* kSpecialPieces[] = {"<pad>", "<bos>", "<eot>", "<unk>"};
constexpr int64_t kSpecialCount = 4;
constexpr size_t kMaxSentenceBytes = 4192;                   // SentencePiece's default max_sentence_length
constexpr const char* kSentencePieceSpace = "\xe2\x96\x81";  // U+2581, UTF-8

// Lowercased runs of ASCII letters, digits and apostrophes; bytes >= 0x80 (UTF-8) count as letters, so
// non-ASCII words stay whole. Everything else separates words.
std::vector<std::string> split_words(const std::string& text) {
  std::vector<std::string> words;
  std::string word;
  for (const char raw : text) {
    const unsigned char c = static_cast<unsigned char>(raw);
    if (std::isalnum(c) || c == '\'' || c >= 0x80) {
      word += static_cast<char>(c < 0x80 ? std::tolower(c) : c);
    } else if (!word.empty()) {
      words.push_back(std::move(word));
      word.clear();
    }
  }
  if (!word.empty()) words.push_back(std::move(word));
  return words;
}

// Note [Reading the model type from the proto]: a loaded SentencePiece model must report the kind it was
// trained as (the metadata of a dataset imported with a BPE model said "unigram"). The kind is
// TrainerSpec.model_type in the serialized ModelProto, but libsentencepiece-dev ships no
// sentencepiece_model.pb.h to read it through, so the two fields are read from the protobuf wire format
// here: ModelProto field 2 (trainer_spec, a length-delimited message), in it field 3 (model_type, a varint
// enum: UNIGRAM 1, BPE 2, WORD 3, CHAR 4; absent means UNIGRAM, the proto's default). Only called on bytes
// that LoadFromSerializedProto accepted, so a malformed field just stops the scan.
class WireReader {
 public:
  explicit WireReader(std::string_view bytes) : bytes_(bytes) {}
  bool done() const { return position_ >= bytes_.size(); }
  bool varint(uint64_t* value) {
    *value = 0;
    for (int shift = 0; shift < 64 && position_ < bytes_.size(); shift += 7) {
      const auto byte = static_cast<unsigned char>(bytes_[position_++]);
      *value |= static_cast<uint64_t>(byte & 0x7f) << shift;
      if (!(byte & 0x80)) return true;
    }
    return false;
  }
  // Reads one field's key and value: a varint's value into *number, a length-delimited field's bytes into
  // *bytes; other wire types are skipped. False at the end or on a malformed field.
  bool field(uint64_t* number, uint64_t* wire_type, uint64_t* value, std::string_view* bytes) {
    uint64_t key = 0;
    if (!varint(&key)) return false;
    *number = key >> 3;
    *wire_type = key & 7;
    switch (*wire_type) {
      case 0:
        return varint(value);
      case 1:
        return skip(8);
      case 2:
        if (!varint(value) || *value > bytes_.size() - position_) return false;
        *bytes = bytes_.substr(position_, *value);
        position_ += *value;
        return true;
      case 5:
        return skip(4);
      default:
        return false;
    }
  }

 private:
  bool skip(size_t n) {
    if (n > bytes_.size() - position_) return false;
    position_ += n;
    return true;
  }
  std::string_view bytes_;
  size_t position_ = 0;
};

// TrainerSpec.model_type of a serialized ModelProto (Note [Reading the model type from the proto]).
constexpr uint64_t kUnigramModel = 1, kBpeModel = 2;  // TrainerSpec.ModelType (WORD 3, CHAR 4)

uint64_t sentencepiece_model_type(std::string_view model) {
  constexpr uint64_t kTrainerSpecField = 2, kModelTypeField = 3;
  uint64_t model_type = kUnigramModel;
  WireReader outer(model);
  uint64_t number = 0, wire_type = 0, value = 0;
  std::string_view spec;
  while (outer.field(&number, &wire_type, &value, &spec)) {
    if (number != kTrainerSpecField || wire_type != 2) continue;
    WireReader inner(spec);
    std::string_view unused;
    while (inner.field(&number, &wire_type, &value, &unused)) {
      if (number == kModelTypeField && wire_type == 0)
        model_type = value;  // the last one wins, as in protobuf
    }
  }
  return model_type;
}

// A SentencePiece dataset's vocab.txt (pieces such as "▁walk", U+2581 marking a word start) is the likely
// wrong file for a word vocabulary: read as words, nearly every caption word became <unk>. Throws naming the
// first line with the mark, wherever it is (a line like "." earlier would otherwise get a vaguer error).
void refuse_sentencepiece_pieces(const std::string& bytes, const std::string& name) {
  const size_t mark = bytes.find(kSentencePieceSpace);
  if (mark == std::string::npos) return;
  const size_t begin = bytes.rfind('\n', mark) == std::string::npos ? 0 : bytes.rfind('\n', mark) + 1;
  const size_t end = std::min(bytes.find('\n', mark), bytes.size());
  std::string piece = bytes.substr(begin, end - begin);
  if (!piece.empty() && piece.back() == '\r') piece.pop_back();
  throw std::runtime_error(
      fmt::format("{}:{}: '{}' is a SentencePiece piece (U+2581 marks a word start), not a word: this is the "
                  "vocab.txt of a "
                  "SentencePiece dataset, which lists its pieces for reading only. HINT: pass that dataset's "
                  "tokenizer.model as the tokenizer model",
                  name, 1 + std::count(bytes.begin(), bytes.begin() + begin, '\n'), piece));
}

// Throws unless `word` (line `line` of the word vocabulary `name`) is one split_words can produce: any other
// line never matches a caption word.
void check_vocabulary_word(const std::string& word, const std::string& name, int64_t line) {
  if (split_words(word) != std::vector<std::string>{word}) {
    throw std::runtime_error(fmt::format(
        "{}:{}: '{}' can never match a caption word (words are lowercased runs of letters, digits and "
        "apostrophes). HINT: a word vocabulary is the vocab.txt of a dataset imported with --tokenizer word",
        name, line, word));
  }
}

class VectorIterator : public sentencepiece::SentenceIterator {
 public:
  explicit VectorIterator(const std::vector<std::string>& texts) : texts_(texts) { skip(); }
  bool done() const override { return index_ >= texts_.size(); }
  void Next() override {
    ++index_;
    skip();
  }
  const std::string& value() const override { return texts_[index_]; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  void skip() {
    while (index_ < texts_.size() && (texts_[index_].empty() || texts_[index_].size() > kMaxSentenceBytes))
      ++index_;
  }
  const std::vector<std::string>& texts_;
  size_t index_ = 0;
};

}  // namespace

struct Tokenizer::Impl {
  TokenizerKind kind = TokenizerKind::Word;
  std::string name;
  // Word
  std::vector<std::string> words;  // id -> word (the first four are the special pieces)
  std::unordered_map<std::string, int64_t> word_ids;
  // SentencePiece
  sentencepiece::SentencePieceProcessor processor;
  std::string serialized;
};

TokenizerKind tokenizer_kind_from_name(const std::string& name) {
  if (name == "word") return TokenizerKind::Word;
  if (name == "unigram") return TokenizerKind::Unigram;
  if (name == "bpe") return TokenizerKind::Bpe;
  throw std::runtime_error(fmt::format("unknown tokenizer kind '{}' (expected word, unigram or bpe)", name));
}

const char* tokenizer_kind_name(TokenizerKind kind) {
  switch (kind) {
    case TokenizerKind::Word:
      return "word";
    case TokenizerKind::Unigram:
      return "unigram";
    case TokenizerKind::Bpe:
      return "bpe";
  }
  return "?";
}

Tokenizer Tokenizer::train(const std::vector<std::string>& texts, const TokenizerTrainOptions& options) {
  if (options.vocab_size <= kSpecialCount) {
    throw std::runtime_error(fmt::format("tokenizer vocab_size must exceed the {} special ids, found {}",
                                         kSpecialCount, options.vocab_size));
  }
  if (options.kind == TokenizerKind::Word) {
    std::map<std::string, int64_t> counts;
    for (const std::string& text : texts)
      for (std::string& word : split_words(text)) ++counts[std::move(word)];
    std::vector<std::pair<std::string, int64_t>> ranked;
    for (const auto& [word, count] : counts) {
      if (count >= options.min_word_count) ranked.emplace_back(word, count);
    }
    if (ranked.empty()) throw std::runtime_error("tokenizer training: the captions hold no words");
    std::stable_sort(ranked.begin(), ranked.end(),
                     [](const auto& a, const auto& b) { return a.second > b.second; });
    std::string vocab;
    for (const char* special : kSpecialPieces) vocab += std::string(special) + "\n";
    const size_t keep = std::min(ranked.size(), static_cast<size_t>(options.vocab_size - kSpecialCount));
    for (size_t i = 0; i < keep; ++i) vocab += ranked[i].first + "\n";
    return from_bytes(TokenizerKind::Word, vocab, "trained word vocabulary");
  }

  VectorIterator sentences(texts);
  if (sentences.done()) throw std::runtime_error("tokenizer training: no non-empty caption to train on");
  const std::unordered_map<std::string, std::string> args = {
      {"model_type", tokenizer_kind_name(options.kind)},
      {"vocab_size", std::to_string(options.vocab_size)},
      {"hard_vocab_limit", "false"},
      {"character_coverage", "1.0"},
      {"pad_id", std::to_string(kPadId)},
      {"bos_id", std::to_string(kBosId)},
      {"eos_id", std::to_string(kEotId)},
      {"unk_id", std::to_string(kUnkId)},
      {"pad_piece", kSpecialPieces[kPadId]},
      {"bos_piece", kSpecialPieces[kBosId]},
      {"eos_piece", kSpecialPieces[kEotId]},
      {"unk_piece", kSpecialPieces[kUnkId]},
      // Note [Deterministic tokenizer training]
      {"num_threads", "1"},
      {"input_sentence_size", "0"},
      {"shuffle_input_sentence", "false"},
  };
  const int log_level = sentencepiece::logging::GetMinLogLevel();
  sentencepiece::logging::SetMinLogLevel(2);  // the trainer logs every EM round to stderr otherwise
  std::string serialized;
  const auto status = sentencepiece::SentencePieceTrainer::Train(args, &sentences, &serialized);
  sentencepiece::logging::SetMinLogLevel(log_level);
  if (!status.ok()) {
    throw std::runtime_error(fmt::format("SentencePiece {} training on {} captions failed: {}",
                                         tokenizer_kind_name(options.kind), texts.size(), status.ToString()));
  }
  return from_bytes(options.kind, serialized, "trained SentencePiece model");
}

Tokenizer Tokenizer::load(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error(fmt::format("{}: cannot open tokenizer model", path));
  std::ostringstream bytes;
  bytes << file.rdbuf();
  const bool is_text = path.size() >= 4 && path.compare(path.size() - 4, 4, ".txt") == 0;
  return from_bytes(is_text ? TokenizerKind::Word : TokenizerKind::Unigram, bytes.str(), path);
}

Tokenizer Tokenizer::from_bytes(TokenizerKind kind, const std::string& bytes, const std::string& name) {
  auto impl = std::make_shared<Impl>();
  impl->name = name;
  if (kind == TokenizerKind::Word) {
    impl->kind = kind;
    refuse_sentencepiece_pieces(bytes, name);
    std::istringstream lines(bytes);
    std::string word;
    while (std::getline(lines, word)) {
      if (!word.empty() && word.back() == '\r') word.pop_back();
      const int64_t id = static_cast<int64_t>(impl->words.size());
      if (id < kSpecialCount && word != kSpecialPieces[id]) {
        throw std::runtime_error(
            fmt::format("{}: line {} must be '{}' (the special ids come first), found '{}'", name, id + 1,
                        kSpecialPieces[id], word));
      }
      if (word.empty() || !impl->word_ids.emplace(word, id).second) {
        throw std::runtime_error(fmt::format("{}: line {}: {} word", name, id + 1,
                                             word.empty() ? "empty" : "repeated '" + word + "'"));
      }
      if (id >= kSpecialCount) check_vocabulary_word(word, name, id + 1);
      impl->words.push_back(word);
    }
    if (impl->words.size() < kSpecialCount) {
      throw std::runtime_error(
          fmt::format("{}: a word vocabulary needs at least the {} special lines <pad> "
                      "<bos> <eot> <unk>",
                      name, kSpecialCount));
    }
    return Tokenizer(std::move(impl));
  }
  const auto status = impl->processor.LoadFromSerializedProto(bytes);
  if (!status.ok()) {
    throw std::runtime_error(fmt::format("{}: not a SentencePiece model: {}", name, status.ToString()));
  }
  const auto& p = impl->processor;
  if (p.pad_id() != kPadId || p.bos_id() != kBosId || p.eos_id() != kEotId || p.unk_id() != kUnkId) {
    throw std::runtime_error(
        fmt::format("{}: SentencePiece model has pad/bos/eos/unk ids {}/{}/{}/{}, vimo needs "
                    "{}/{}/{}/{}. HINT: train it with `vimo data import videos` (or "
                    "spm_train --pad_id=0 --bos_id=1 --eos_id=2 --unk_id=3)",
                    name, p.pad_id(), p.bos_id(), p.eos_id(), p.unk_id(), kPadId, kBosId, kEotId, kUnkId));
  }
  // Note [Reading the model type from the proto]
  const uint64_t model_type = sentencepiece_model_type(bytes);
  if (model_type != kUnigramModel && model_type != kBpeModel) {
    throw std::runtime_error(fmt::format(
        "{}: a SentencePiece {} model; vimo reads unigram and BPE models. HINT: train one with `vimo data "
        "import videos --tokenizer unigram|bpe` (or spm_train --model_type=unigram|bpe)",
        name,
        model_type == 3   ? "word"
        : model_type == 4 ? "char"
                          : fmt::format("model_type {}", model_type)));
  }
  impl->kind = model_type == kBpeModel ? TokenizerKind::Bpe : TokenizerKind::Unigram;
  impl->serialized = bytes;
  return Tokenizer(std::move(impl));
}

TokenizerKind Tokenizer::kind() const { return impl_->kind; }

int64_t Tokenizer::vocab_size() const {
  return impl_->kind == TokenizerKind::Word ? static_cast<int64_t>(impl_->words.size())
                                            : impl_->processor.GetPieceSize();
}

std::vector<int64_t> Tokenizer::encode(const std::string& text) const {
  std::vector<int64_t> ids;
  if (impl_->kind == TokenizerKind::Word) {
    for (const std::string& word : split_words(text)) {
      const auto it = impl_->word_ids.find(word);
      ids.push_back(it == impl_->word_ids.end() || it->second < kSpecialCount ? kUnkId : it->second);
    }
    return ids;
  }
  std::vector<int> pieces;
  const auto status = impl_->processor.Encode(text, &pieces);
  if (!status.ok())
    throw std::runtime_error(fmt::format("{}: encoding failed: {}", impl_->name, status.ToString()));
  ids.assign(pieces.begin(), pieces.end());
  return ids;
}

std::vector<int64_t> Tokenizer::encode_padded(const std::string& text, int64_t max_len,
                                              bool* truncated) const {
  if (max_len < 2)
    throw std::runtime_error(fmt::format("encode_padded: max_len must be >= 2, found {}", max_len));
  std::vector<int64_t> pieces = encode(text);
  const bool cut = static_cast<int64_t>(pieces.size()) > max_len - 2;
  if (cut) pieces.resize(max_len - 2);
  if (truncated) *truncated = cut;
  std::vector<int64_t> ids(max_len, kPadId);
  ids[0] = kBosId;
  std::copy(pieces.begin(), pieces.end(), ids.begin() + 1);
  ids[pieces.size() + 1] = kEotId;
  return ids;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids) const {
  std::vector<int64_t> kept;
  for (int64_t id : ids) {
    if (id != kPadId && id != kBosId && id != kEotId) kept.push_back(id);
  }
  if (impl_->kind == TokenizerKind::Word) {
    std::string text;
    for (int64_t id : kept) {
      if (id < 0 || id >= vocab_size())
        throw std::runtime_error(fmt::format("decode: id {} outside the vocabulary", id));
      text += (text.empty() ? "" : " ") + impl_->words[id];
    }
    return text;
  }
  std::vector<int> pieces;
  for (int64_t id : kept) {
    if (id < 0 || id >= vocab_size())
      throw std::runtime_error(fmt::format("decode: id {} outside the vocabulary", id));
    pieces.push_back(static_cast<int>(id));
  }
  std::string text;
  const auto status = impl_->processor.Decode(pieces, &text);
  if (!status.ok())
    throw std::runtime_error(fmt::format("{}: decoding failed: {}", impl_->name, status.ToString()));
  return text;
}

std::string Tokenizer::model_file_name() const {
  return impl_->kind == TokenizerKind::Word ? "vocab.txt" : "tokenizer.model";
}

std::string Tokenizer::model_bytes() const {
  return impl_->kind == TokenizerKind::Word ? vocab_text() : impl_->serialized;
}

std::string Tokenizer::vocab_text() const {
  std::string text;
  for (int64_t id = 0; id < vocab_size(); ++id) {
    text += (impl_->kind == TokenizerKind::Word ? impl_->words[id]
                                                : impl_->processor.IdToPiece(static_cast<int>(id))) +
            "\n";
  }
  return text;
}

}  // namespace vimo::data
