// Defines the `vimo data` subcommands: synth, import humanml3d, import videos, pack, verify.
#pragma once

#include <CLI/CLI.hpp>
#include <memory>
#include <optional>

namespace vimo::trainer {

class DataCommands {
 public:
  // Registers the subcommands under `data` (the `vimo data` subcommand).
  explicit DataCommands(CLI::App& data);
  ~DataCommands();
  // Runs the subcommand that was parsed and returns its exit code; nothing when none of ours was chosen.
  std::optional<int> run() const;

 private:
  struct Options;
  std::unique_ptr<Options> options_;
};

}  // namespace vimo::trainer
