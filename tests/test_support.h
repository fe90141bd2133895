// Helpers shared by the test suites: scratch directories, error-message expectations, a tiny model.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "models/gemini_config.h"

namespace vimo::testing {

// An empty directory <TempDir>/vimo_<suite>_<pid>/<name>, unique per process so parallel ctest runs of
// different test binaries never share files.
inline std::filesystem::path fresh_test_dir(const std::string& suite, const std::string& name) {
  namespace fs = std::filesystem;
  fs::path dir = fs::path(::testing::TempDir()) / ("vimo_" + suite + "_" + std::to_string(::getpid())) / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// Expects `body` to throw std::runtime_error whose message contains every one of `parts`.
inline void expect_error(const std::function<void()>& body, const std::vector<std::string>& parts) {
  try {
    body();
    ADD_FAILURE() << "expected an error containing '" << parts.front() << "'";
  } catch (const std::runtime_error& e) {
    const std::string message = e.what();
    for (const std::string& part : parts) {
      EXPECT_NE(message.find(part), std::string::npos) << "'" << part << "' not in: " << message;
    }
  }
}

// Gemini-MVR small enough for float64 tests in milliseconds.
inline models::GeminiConfig tiny_gemini_config() {
  models::GeminiConfig c;
  c.vocab_size = 20;
  c.max_text_len = 6;
  c.frames = 4;
  c.feature_dim = 5;
  c.joints = 17;
  c.embed_dim = 8;
  c.width = 8;
  c.heads = 2;
  c.text_layers = 1;
  c.video_layers = 1;
  c.keypoint_width = 4;
  c.spatio_temporal_layers = 1;
  c.temporal_layers = 1;
  return c;
}

}  // namespace vimo::testing
