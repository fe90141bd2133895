// Defines the caption tokenizer: a SentencePiece model (unigram or BPE, trained here on captions or loaded
// from a .model file) or a plain word vocabulary, both mapping text to the id layout of our text encoders:
// <bos> pieces <eot> then <pad>, with the special ids below (the synthetic vocabulary uses the same three).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace vimo::data {

inline constexpr int64_t kPadId = 0;  // padding after <eot>
inline constexpr int64_t kBosId = 1;  // first token of every caption
inline constexpr int64_t kEotId = 2;  // end of text (the text encoder reads its feature here)
inline constexpr int64_t kUnkId = 3;  // unknown piece or word

enum class TokenizerKind {
  Word,     // lowercased alphanumeric words, most frequent first; vocab.txt is the model
  Unigram,  // SentencePiece unigram language model; tokenizer.model is the model
  Bpe,      // SentencePiece byte-pair encoding; tokenizer.model is the model
};
TokenizerKind tokenizer_kind_from_name(const std::string& name);  // "word" | "unigram" | "bpe"
const char* tokenizer_kind_name(TokenizerKind kind);

struct TokenizerTrainOptions {
  TokenizerKind kind = TokenizerKind::Unigram;
  // Vocabulary size including the four special ids. SentencePiece treats it as an upper bound
  // (hard_vocab_limit=false): a small corpus yields fewer pieces instead of an error.
  int64_t vocab_size = 1000;
  int64_t min_word_count = 1;  // Word: rarer words become <unk>
};

// Note [Deterministic tokenizer training]: SentencePiece is trained single-threaded on every sentence in
// the given order (num_threads=1, input_sentence_size=0, shuffle_input_sentence=false), so the same
// captions give byte-identical models across runs (tests/data/test_tokenizer.cpp checks it). The word
// vocabulary is sorted by count, then bytewise.
class Tokenizer {
 public:
  // Trains on `texts` (one caption each; empty ones are ignored). Throws for no usable text.
  static Tokenizer train(const std::vector<std::string>& texts, const TokenizerTrainOptions& options);
  // Loads `path`: a SentencePiece model (*.model) or a word vocabulary (*.txt, one token per line, the
  // first four lines <pad> <bos> <eot> <unk>). A SentencePiece model must use our special ids (pad 0, bos 1,
  // eos 2, unk 3) and be a unigram or BPE model; a word vocabulary must hold only words the caption splitter
  // produces (a SentencePiece dataset's vocab.txt of pieces is refused); the errors say which line.
  static Tokenizer load(const std::string& path);
  // The same from bytes (what model_bytes() returns); `name` appears in errors. `kind` says whether the bytes
  // are a word vocabulary (Word) or a SentencePiece model (Unigram or Bpe: the model's own type is used).
  static Tokenizer from_bytes(TokenizerKind kind, const std::string& bytes, const std::string& name);

  // Word, or the SentencePiece kind the model was trained as (read from the model: Note [Reading the model
  // type from the proto] in tokenizer.cpp).
  TokenizerKind kind() const;
  int64_t vocab_size() const;
  // Piece or word ids of `text`, without special ids.
  std::vector<int64_t> encode(const std::string& text) const;
  // [max_len] ids: <bos> pieces <eot> <pad>...; pieces beyond max_len - 2 are cut (the <eot> is kept) and
  // *truncated says so. max_len must be at least 2.
  std::vector<int64_t> encode_padded(const std::string& text, int64_t max_len,
                                     bool* truncated = nullptr) const;
  // Text of `ids`, skipping <pad>, <bos> and <eot> (words are joined by single spaces).
  std::string decode(const std::vector<int64_t>& ids) const;

  // The file that load() reads back ("tokenizer.model" or "vocab.txt") and its bytes.
  std::string model_file_name() const;
  std::string model_bytes() const;
  // vocab_size() lines, line i the piece or word of id i: the vocab.txt every dataset carries.
  std::string vocab_text() const;

 private:
  struct Impl;
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
};

}  // namespace vimo::data
