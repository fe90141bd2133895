// Corrupt or hostile checkpoint files, one process: each is a clear error that names the file, never a bare
// c10 / nlohmann exception, and never accepted (found by an audit of the sharded checkpoints; each test
// failed before the fix).
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "checkpoints/checkpoint.h"
#include "checkpoints/safetensors.h"
#include "checkpoints/sharded_state.h"
#include "tests/test_support.h"

namespace {
namespace fs = std::filesystem;
using vimo::checkpoints::CheckpointManager;
using vimo::checkpoints::StateReader;
using vimo::checkpoints::TensorFile;

// Writes a safetensors file with the given header (padded to 8 bytes) followed by `data_bytes` zero bytes.
std::string write_raw(const fs::path& path, const nlohmann::json& header, size_t data_bytes) {
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  const uint64_t length = text.size();
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(&length), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  const std::string zeros(data_bytes, '\0');
  out.write(zeros.data(), static_cast<std::streamsize>(zeros.size()));
  return path.string();
}

// Any exception (std::runtime_error, c10::Error, nlohmann's) must come, and must name `path`.
template <typename Body>
void expect_error_naming(const Body& body, const std::string& path, const std::string& what) {
  try {
    body();
    ADD_FAILURE() << what << ": accepted, expected an error naming " << path;
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos)
        << what << ": the error does not name " << path << ":\n"
        << e.what();
  }
}

// A piece whose metadata gives a shape with negative sizes (whose product still equals its element count).
TEST(HostileCheckpoint, APieceWithANegativeShapeIsAnErrorNamingTheFile) {
  const fs::path dir = vimo::testing::fresh_test_dir("checkpoint_hostile", "negative_piece_shape");
  const std::string path = write_raw(dir / "rank_00001.safetensors",
                                     {{"__metadata__", {{"piece:x", R"({"offset": 0, "shape": [-2, -2]})"}}},
                                      {"x", {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0, 16}}}}},
                                     16);
  expect_error_naming([&] { StateReader reader(std::vector<std::string>{path}); }, path,
                      "piece shape [-2, -2]");
}

// A piece whose metadata gives a shape whose element count overflows int64 ((2^62 + 1) * 4 wraps to 4).
TEST(HostileCheckpoint, APieceShapeWhoseElementCountOverflowsIsAnErrorNamingTheFile) {
  const fs::path dir = vimo::testing::fresh_test_dir("checkpoint_hostile", "overflowing_piece_shape");
  const std::string path =
      write_raw(dir / "rank_00001.safetensors",
                {{"__metadata__", {{"piece:x", R"({"offset": 0, "shape": [4611686018427387905, 4]})"}}},
                 {"x", {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0, 16}}}}},
                16);
  expect_error_naming([&] { StateReader reader(std::vector<std::string>{path}); }, path,
                      "piece shape [2^62 + 1, 4]");
}

// A negative piece offset is reported as out of place, not as a second copy of elements [-2, 0).
TEST(HostileCheckpoint, ANegativePieceOffsetIsReportedAsSuch) {
  const fs::path dir = vimo::testing::fresh_test_dir("checkpoint_hostile", "negative_offset");
  const std::string path = write_raw(dir / "rank_00001.safetensors",
                                     {{"__metadata__", {{"piece:x", R"({"offset": -2, "shape": [4]})"}}},
                                      {"x", {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0, 16}}}}},
                                     16);
  try {
    StateReader reader(std::vector<std::string>{path});
    ADD_FAILURE() << "a negative offset was accepted";
  } catch (const std::exception& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(path), std::string::npos) << message;
    EXPECT_EQ(message.find("two copies"), std::string::npos) << "misleading: " << message;
  }
}

// A header shape whose byte count overflows uint64 (F32 of [2^62 + 1]: 2^64 + 4 bytes, which would wrap to 4
// and match data_offsets [0, 4]).
TEST(HostileCheckpoint, AHeaderShapeWhoseByteCountOverflowsIsAnErrorNamingTheFile) {
  const fs::path dir = vimo::testing::fresh_test_dir("checkpoint_hostile", "overflowing_header_shape");
  const std::string path = write_raw(
      dir / "rank_00000.safetensors",
      {{"x", {{"dtype", "F32"}, {"shape", {int64_t{4611686018427387905}}}, {"data_offsets", {0, 4}}}}}, 4);
  expect_error_naming([&] { vimo::checkpoints::read_safetensors_index(path); }, path, "index");
  expect_error_naming([&] { vimo::checkpoints::read_safetensors(path); }, path, "read_safetensors");
}

// Malformed header entries: a metadata value that is not a string, a tensor entry without "dtype".
TEST(HostileCheckpoint, AMalformedHeaderEntryIsAnErrorNamingTheFile) {
  const fs::path dir = vimo::testing::fresh_test_dir("checkpoint_hostile", "malformed_header");
  const std::string metadata = write_raw(dir / "metadata.safetensors", {{"__metadata__", {{"step", 3}}}}, 0);
  expect_error_naming([&] { vimo::checkpoints::read_safetensors_index(metadata); }, metadata,
                      "a metadata value that is a number");
  const std::string no_dtype =
      write_raw(dir / "no_dtype.safetensors", {{"x", {{"shape", {1}}, {"data_offsets", {0, 4}}}}}, 4);
  expect_error_naming([&] { vimo::checkpoints::read_safetensors_index(no_dtype); }, no_dtype,
                      "a tensor without dtype");
}

// A manifest whose "rank_files" is not a count from 1 to its world size: a string, 0, -1.
TEST(HostileCheckpoint, AManifestWithABadRankFilesCountIsAnErrorNamingIt) {
  const fs::path root = vimo::testing::fresh_test_dir("checkpoint_hostile", "rank_files") / "checkpoints";
  TensorFile state;
  state.tensors["model.w"] = at::ones({2});
  const std::string dir = CheckpointManager(root.string(), 2, nullptr).save(1, state, "{}", "");
  const fs::path manifest_path = fs::path(dir) / "manifest.json";
  nlohmann::json manifest = nlohmann::json::parse(std::ifstream(manifest_path));
  for (const nlohmann::json& bad : {nlohmann::json("2"), nlohmann::json(0), nlohmann::json(-1)}) {
    manifest["rank_files"] = bad;
    std::ofstream(manifest_path) << manifest.dump(2);
    expect_error_naming([&] { CheckpointManager::load(dir); }, manifest_path.string(),
                        "rank_files " + bad.dump());
  }
}

}  // namespace
