// Tests the caption tokenizer: SentencePiece unigram and BPE training is deterministic, encoding round-trips,
// the special ids and padding layout, saving and loading, and the word vocabulary.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "tests/test_support.h"

namespace vimo::data {
namespace {

namespace fs = std::filesystem;
using vimo::testing::expect_error;

// A small caption corpus in the style of the retrieval captions.
std::vector<std::string> captions() {
  const std::vector<std::string> subjects = {"a man", "a woman", "the person", "a child", "someone"};
  const std::vector<std::string> verbs = {
      "walks forward",       "jumps twice",      "waves both hands",         "kicks a ball",
      "turns around slowly", "runs in a circle", "squats down and stands up"};
  const std::vector<std::string> ends = {"", " while holding a cup", " then stops", " on the left side"};
  std::vector<std::string> out;
  for (const auto& s : subjects)
    for (const auto& v : verbs)
      for (const auto& e : ends) out.push_back(s + " " + v + e + ".");
  return out;
}

TEST(Tokenizer, SentencePieceTrainingIsDeterministicAndRoundTrips) {
  for (TokenizerKind kind : {TokenizerKind::Unigram, TokenizerKind::Bpe}) {
    SCOPED_TRACE(tokenizer_kind_name(kind));
    TokenizerTrainOptions options;
    options.kind = kind;
    options.vocab_size = 80;
    const Tokenizer first = Tokenizer::train(captions(), options);
    const Tokenizer second = Tokenizer::train(captions(), options);
    EXPECT_EQ(first.model_bytes(), second.model_bytes());  // Note [Deterministic tokenizer training]
    EXPECT_LE(first.vocab_size(), 80);
    EXPECT_GT(first.vocab_size(), 20);
    EXPECT_EQ(first.model_file_name(), "tokenizer.model");

    for (const std::string& text :
         {std::string("a man walks forward."), std::string("someone kicks a cup then stops.")}) {
      const std::vector<int64_t> ids = first.encode(text);
      ASSERT_FALSE(ids.empty());
      for (int64_t id : ids) {
        EXPECT_GT(id, kEotId);
        EXPECT_LT(id, first.vocab_size());
      }
      EXPECT_EQ(first.decode(ids), text);
      EXPECT_EQ(second.encode(text), ids);
      bool truncated = true;
      const std::vector<int64_t> padded =
          first.encode_padded(text, static_cast<int64_t>(ids.size()) + 5, &truncated);
      EXPECT_FALSE(truncated);
      std::vector<int64_t> expected = {kBosId};
      expected.insert(expected.end(), ids.begin(), ids.end());
      expected.push_back(kEotId);
      expected.resize(ids.size() + 5, kPadId);
      EXPECT_EQ(padded, expected);
      EXPECT_EQ(first.decode(padded), text);
      const std::vector<int64_t> cut = first.encode_padded(text, 3, &truncated);
      EXPECT_TRUE(truncated);
      EXPECT_EQ(cut, (std::vector<int64_t>{kBosId, ids[0], kEotId}));
    }
    const std::vector<std::string> pieces = [&] {
      std::vector<std::string> lines;
      std::string text = first.vocab_text(), line;
      for (char c : text) {
        if (c == '\n') {
          lines.push_back(line);
          line.clear();
        } else {
          line += c;
        }
      }
      return lines;
    }();
    ASSERT_EQ(static_cast<int64_t>(pieces.size()), first.vocab_size());
    EXPECT_EQ(pieces[0], "<pad>");
    EXPECT_EQ(pieces[1], "<bos>");
    EXPECT_EQ(pieces[2], "<eot>");
    EXPECT_EQ(pieces[3], "<unk>");
  }
}

TEST(Tokenizer, SavesAndLoadsSentencePieceModels) {
  const fs::path dir = vimo::testing::fresh_test_dir("tokenizer", "SavesAndLoads");
  TokenizerTrainOptions options;
  options.vocab_size = 60;
  const Tokenizer trained = Tokenizer::train(captions(), options);
  const fs::path path = dir / trained.model_file_name();
  std::ofstream(path, std::ios::binary) << trained.model_bytes();
  const Tokenizer loaded = Tokenizer::load(path.string());
  EXPECT_EQ(loaded.vocab_size(), trained.vocab_size());
  EXPECT_EQ(loaded.encode("a child jumps twice on the left side."),
            trained.encode("a child jumps twice on the left side."));
  std::ofstream(dir / "junk.model", std::ios::binary) << "not a model";
  expect_error([&] { Tokenizer::load((dir / "junk.model").string()); },
               {"junk.model", "not a SentencePiece model"});
  expect_error([&] { Tokenizer::load((dir / "absent.model").string()); }, {"absent.model", "cannot open"});
  expect_error([] { Tokenizer::train({"", ""}, TokenizerTrainOptions{}); }, {"no non-empty caption"});
}

TEST(Tokenizer, WordVocabulary) {
  TokenizerTrainOptions options;
  options.kind = TokenizerKind::Word;
  options.vocab_size = 4 + 3;
  const Tokenizer words = Tokenizer::train({"A man walks.", "a man runs!", "a dog"}, options);
  // counts: a 3, man 2, then dog/runs/walks 1 each in byte order; three words fit.
  EXPECT_EQ(words.vocab_text(), "<pad>\n<bos>\n<eot>\n<unk>\na\nman\ndog\n");
  EXPECT_EQ(words.vocab_size(), 7);
  EXPECT_EQ(words.model_file_name(), "vocab.txt");
  EXPECT_EQ(words.encode("A MAN, a cat"), (std::vector<int64_t>{4, 5, 4, kUnkId}));
  EXPECT_EQ(words.encode_padded("a man", 5), (std::vector<int64_t>{kBosId, 4, 5, kEotId, kPadId}));
  EXPECT_EQ(words.decode({kBosId, 4, 6, kEotId, kPadId}), "a dog");
  const Tokenizer reloaded = Tokenizer::from_bytes(TokenizerKind::Word, words.model_bytes(), "vocab.txt");
  EXPECT_EQ(reloaded.encode("man dog"), (std::vector<int64_t>{5, 6}));
  expect_error([] { Tokenizer::from_bytes(TokenizerKind::Word, "<pad>\n<eot>\n", "v.txt"); },
               {"v.txt", "line 2 must be '<bos>'"});
  expect_error(
      [] { Tokenizer::from_bytes(TokenizerKind::Word, "<pad>\n<bos>\n<eot>\n<unk>\nx\nx\n", "v.txt"); },
      {"v.txt", "line 6", "repeated 'x'"});
  expect_error([] { tokenizer_kind_from_name("wordpiece"); }, {"unknown tokenizer kind 'wordpiece'"});
}

// A loaded model reports the type it was trained as, read from the model itself (a BPE model loaded from a
// file said "unigram", and a dataset imported with it was labelled so); SentencePiece word and char models
// are refused by name.
TEST(Tokenizer, ALoadedModelReportsItsOwnType) {
  const fs::path dir = vimo::testing::fresh_test_dir("tokenizer", "ALoadedModelReportsItsOwnType");
  for (TokenizerKind kind : {TokenizerKind::Unigram, TokenizerKind::Bpe}) {
    SCOPED_TRACE(tokenizer_kind_name(kind));
    TokenizerTrainOptions options;
    options.kind = kind;
    options.vocab_size = 60;
    const Tokenizer trained = Tokenizer::train(captions(), options);
    const fs::path path = dir / (std::string(tokenizer_kind_name(kind)) + ".model");
    std::ofstream(path, std::ios::binary) << trained.model_bytes();
    EXPECT_EQ(Tokenizer::load(path.string()).kind(), kind);
    // from_bytes takes the kind from the model, whichever SentencePiece kind it is told.
    EXPECT_EQ(Tokenizer::from_bytes(TokenizerKind::Unigram, trained.model_bytes(), "m").kind(), kind);
    EXPECT_EQ(Tokenizer::from_bytes(TokenizerKind::Bpe, trained.model_bytes(), "m").kind(), kind);
  }
  TokenizerTrainOptions options;
  options.vocab_size = 60;
  const std::string unigram = Tokenizer::train(captions(), options).model_bytes();
  // A second trainer_spec field is merged into the first (protobuf): model_type 3 (WORD), then 4 (CHAR).
  for (const auto& [type, name] : {std::pair{'\x03', "word"}, std::pair{'\x04', "char"}}) {
    const std::string retyped = unigram + std::string("\x12\x02\x18", 3) + type;
    expect_error(
        [&] { Tokenizer::from_bytes(TokenizerKind::Unigram, retyped, "retyped.model"); },
        {"retyped.model", std::string("a SentencePiece ") + name + " model", "unigram and BPE", "HINT"});
  }
  const std::string bpe = unigram + std::string("\x12\x02\x18\x02", 4);
  EXPECT_EQ(Tokenizer::from_bytes(TokenizerKind::Unigram, bpe, "m").kind(), TokenizerKind::Bpe);
}

// A SentencePiece dataset's vocab.txt lists pieces ("▁walk"): read as a word vocabulary, nearly every word
// became <unk>. It is refused, naming the line and pointing at the .model; so is any line the word splitter
// never produces.
TEST(Tokenizer, AWordVocabularyHoldsOnlyWords) {
  const fs::path dir = vimo::testing::fresh_test_dir("tokenizer", "AWordVocabularyHoldsOnlyWords");
  TokenizerTrainOptions options;
  options.kind = TokenizerKind::Bpe;
  options.vocab_size = 60;
  const Tokenizer pieces = Tokenizer::train(captions(), options);
  std::ofstream(dir / "vocab.txt", std::ios::binary) << pieces.vocab_text();
  expect_error([&] { Tokenizer::load((dir / "vocab.txt").string()); },
               {(dir / "vocab.txt").string() + ":", "SentencePiece piece", "U+2581", "tokenizer.model"});
  const std::string specials = "<pad>\n<bos>\n<eot>\n<unk>\n";
  expect_error(
      [&] {
        Tokenizer::from_bytes(TokenizerKind::Word,
                              specials +
                                  "a\n\xe2\x96\x81"
                                  "a\n",
                              "v.txt");
      },
      {"v.txt:6",
       "'\xe2\x96\x81"
       "a'",
       "SentencePiece piece"});
  for (const std::string word : {"Walk", "walks.", "two words", "<s>"}) {
    expect_error(
        [&] { Tokenizer::from_bytes(TokenizerKind::Word, specials + "man\n" + word + "\n", "v.txt"); },
        {"v.txt:6", "'" + word + "' can never match", "HINT"});
  }
  const Tokenizer words =
      Tokenizer::from_bytes(TokenizerKind::Word, specials + "don't\n\xc3\xa9t\xc3\xa9\nx2\n", "v.txt");
  EXPECT_EQ(words.encode("Don't x2"), (std::vector<int64_t>{4, 6}));
}

}  // namespace
}  // namespace vimo::data
