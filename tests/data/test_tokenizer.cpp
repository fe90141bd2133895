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

}  // namespace
}  // namespace vimo::data
