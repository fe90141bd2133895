// Tensors saved in pieces (see sharded_state.h and its Note [Tensors saved in pieces]).
#include "checkpoints/sharded_state.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <stdexcept>

namespace vimo::checkpoints {
namespace {

constexpr const char* kPiecePrefix = "piece:";

// The number of elements of `shape`; -1 when a size is negative or the product overflows int64.
int64_t element_count(const std::vector<int64_t>& shape) {
  int64_t count = 1;
  for (const int64_t size : shape) {
    if (size < 0 || __builtin_mul_overflow(count, size, &count)) return -1;
  }
  return count;
}

}  // namespace

void add_pieces(TensorFile& file, const std::map<std::string, TensorPiece>& pieces) {
  for (const auto& [name, piece] : pieces) {
    if (file.tensors.count(name))
      throw std::invalid_argument("add_pieces: '" + name + "' is already in the file");
    const int64_t count = piece.data.numel(), whole = element_count(piece.shape);
    if (piece.data.dim() != 1 || whole < 0 || piece.offset < 0 || count > whole - piece.offset) {
      throw std::invalid_argument(fmt::format(
          "add_pieces: the piece of '{}' ({} elements at offset {}, {}-D) does not fit its shape [{}]", name,
          count, piece.offset, piece.data.dim(), fmt::join(piece.shape, ", ")));
    }
    file.tensors[name] = piece.data;
    file.metadata[kPiecePrefix + name] =
        nlohmann::json{{"offset", piece.offset}, {"shape", piece.shape}}.dump();
  }
}

StateReader::StateReader(const Checkpoint& checkpoint) {
  for (const std::string& path : checkpoint.rank_files) add_file(path);
  check_pieces();
}

StateReader::StateReader(const std::vector<std::string>& files) {
  for (const std::string& path : files) add_file(path);
  check_pieces();
}

StateReader::StateReader(const std::map<std::string, at::Tensor>& whole) {
  for (const auto& [name, tensor] : whole) {
    Saved& saved = tensors_[name];
    saved.shape = tensor.sizes().vec();
    saved.dtype = tensor.scalar_type();
    saved.where = "the tensors given";
    saved.pieces.push_back({0, tensor.numel(), 0, tensor.detach().reshape(-1)});
  }
}

void StateReader::add_file(const std::string& path) {
  files_.push_back(read_safetensors_index(path));
  const TensorFileIndex& index = files_.back();
  for (const auto& [name, entry] : index.tensors) {
    std::vector<int64_t> shape = entry.shape;
    int64_t offset = 0;
    if (const auto it = index.metadata.find(kPiecePrefix + name); it != index.metadata.end()) {
      try {
        const nlohmann::json place = nlohmann::json::parse(it->second);
        offset = place.at("offset").get<int64_t>();
        shape = place.at("shape").get<std::vector<int64_t>>();
      } catch (const nlohmann::json::exception& e) {
        throw std::runtime_error(
            fmt::format("{}: the metadata '{}{}' is malformed: {}", path, kPiecePrefix, name, e.what()));
      }
      if (entry.shape.size() != 1) {
        throw std::runtime_error(fmt::format("{}: '{}' is a piece but has shape [{}], not 1-D", path, name,
                                             fmt::join(entry.shape, ", ")));
      }
      const int64_t whole = element_count(shape);
      if (whole < 0 || offset < 0 || entry.shape[0] > whole - offset) {
        throw std::runtime_error(fmt::format(
            "{}: the piece of '{}' ({} elements at offset {}) does not fit the shape [{}] its metadata gives",
            path, name, entry.shape[0], offset, fmt::join(shape, ", ")));
      }
    }
    Saved& saved = tensors_[name];
    if (saved.pieces.empty()) {
      saved.shape = shape;
      saved.dtype = entry.dtype;
      saved.where = path;
    } else {
      if (saved.shape != shape || saved.dtype != entry.dtype) {
        throw std::runtime_error(fmt::format("'{}' is {} [{}] in {} but {} [{}] in {}", name,
                                             at::toString(saved.dtype), fmt::join(saved.shape, ", "),
                                             saved.where, at::toString(entry.dtype), fmt::join(shape, ", "),
                                             path));
      }
      saved.where += ", " + path;
    }
    const int64_t count = static_cast<int64_t>(entry.bytes / at::elementSize(entry.dtype));
    saved.pieces.push_back({offset, count, files_.size() - 1, at::Tensor()});
  }
}

// Every element of every tensor in exactly one piece: no overlap, no gap.
void StateReader::check_pieces() {
  for (auto& [name, saved] : tensors_) {
    std::sort(saved.pieces.begin(), saved.pieces.end(),
              [](const Piece& a, const Piece& b) { return a.offset < b.offset; });
    const int64_t whole = element_count(saved.shape);
    int64_t next = 0;
    for (const Piece& piece : saved.pieces) {
      if (piece.count == 0) continue;
      if (piece.offset != next) {
        throw std::runtime_error(fmt::format(
            "'{}' (shape [{}]) has {} its elements [{}, {}) in {}", name, fmt::join(saved.shape, ", "),
            piece.offset < next ? "two copies of" : "no piece holding", std::min(piece.offset, next),
            std::max(piece.offset, next), saved.where));
      }
      next = piece.offset + piece.count;
    }
    if (next != whole) {  // pieces end within their tensor (add_file), so next < whole
      throw std::runtime_error(
          fmt::format("'{}' (shape [{}]) has no piece holding its elements [{}, {}) in {}", name,
                      fmt::join(saved.shape, ", "), next, whole, saved.where));
    }
  }
}

const std::vector<int64_t>& StateReader::shape(const std::string& name) const {
  const auto it = tensors_.find(name);
  if (it == tensors_.end()) throw std::runtime_error("'" + name + "' is missing from the checkpoint");
  return it->second.shape;
}

at::Tensor StateReader::read(const std::string& name, int64_t first, int64_t count) const {
  const auto it = tensors_.find(name);
  if (it == tensors_.end()) throw std::runtime_error("'" + name + "' is missing from the checkpoint");
  const Saved& saved = it->second;
  const int64_t whole = element_count(saved.shape);
  if (first < 0 || count < 0 || first > whole || count > whole - first) {
    throw std::runtime_error(fmt::format("elements [{}, {}) of '{}' are out of its {} (in {})", first,
                                         first + count, name, whole, saved.where));
  }
  at::Tensor out = at::empty({count}, at::TensorOptions().dtype(saved.dtype));  // [count]
  for (const Piece& piece : saved.pieces) {
    const int64_t begin = std::max(first, piece.offset),
                  end = std::min(first + count, piece.offset + piece.count);
    if (begin >= end) continue;
    at::Tensor part = piece.memory.defined() ? piece.memory.narrow(0, begin - piece.offset, end - begin)
                                             : read_safetensors_elements(files_[piece.file], name,
                                                                         begin - piece.offset, end - begin);
    out.narrow(0, begin - first, end - begin).copy_(part);
  }
  return out;
}

at::Tensor StateReader::read_whole(const std::string& name) const {
  const std::vector<int64_t>& shape = this->shape(name);
  return read(name, 0, element_count(shape)).view(shape);
}

}  // namespace vimo::checkpoints
