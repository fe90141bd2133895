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
constexpr size_t kMaxSentenceBytes = 4192;  // SentencePiece's default max_sentence_length

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
  impl->kind = kind == TokenizerKind::Bpe ? TokenizerKind::Bpe : TokenizerKind::Unigram;
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
