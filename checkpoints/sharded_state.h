// Defines how a rank that holds only part of a tensor (ZeRO-1's moments) saves that part, and a reader that
// gives any range of a saved tensor back, whether it was saved whole or in parts by any number of ranks.
//
//   // rank r: its pieces, written as rank_0000r.safetensors
//   TensorFile own;
//   add_pieces(own, optimizer.state_pieces());
//   // on resume, over every rank's file: any range, from whichever files hold it
//   StateReader reader(checkpoint);
//   at::Tensor mine = reader.read("optim.w.exp_avg", first, count);
//
// Note [Tensors saved in pieces]: a piece is a 1-D run of a tensor's flattened elements. It is stored in its
// rank's safetensors file under the tensor's own name, and the file's metadata says where it lies:
// "piece:<name>" = {"offset": <first element>, "shape": [<the whole tensor's shape>]}. Every element of a
// tensor is in exactly one piece (a tensor of no elements in one empty piece). A reader on another number of
// ranks cuts other ranges, so it reads across pieces; a tensor saved whole (no "piece:" entry) is one piece
// at offset 0. Python's `safetensors` reads each file; the metadata says how to join them.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <string>
#include <vector>

#include "checkpoints/checkpoint.h"
#include "checkpoints/safetensors.h"

namespace vimo::checkpoints {

// Elements [offset, offset + data.numel()) of a tensor of `shape`, flattened.
struct TensorPiece {
  at::Tensor data;  // 1-D
  int64_t offset = 0;
  std::vector<int64_t> shape;
};

// Adds `pieces` (by tensor name) to `file`: the data under the name, the place in its metadata. A name that
// `file` already holds, or a piece that does not fit its shape, is an error naming it.
void add_pieces(TensorFile& file, const std::map<std::string, TensorPiece>& pieces);

class StateReader {
 public:
  // Over the state files of `checkpoint` (rank 0's and, for a sharded one, every other rank's). Reads their
  // headers now, tensor data only in read().
  explicit StateReader(const Checkpoint& checkpoint);
  // Over whole tensors in memory (AdamW::state_tensors(), say).
  explicit StateReader(const std::map<std::string, at::Tensor>& whole);
  // Over the given safetensors files.
  explicit StateReader(const std::vector<std::string>& files);

  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  // The whole tensor's shape; an error naming it where it is absent.
  const std::vector<int64_t>& shape(const std::string& name) const;
  // Elements [first, first + count) of `name`, flattened ([count], its saved dtype). An error names the
  // tensor and the elements no piece holds.
  at::Tensor read(const std::string& name, int64_t first, int64_t count) const;
  // The whole tensor, in its shape.
  at::Tensor read_whole(const std::string& name) const;

 private:
  struct Piece {
    int64_t offset = 0, count = 0;
    size_t file = 0;    // into files_, when `memory` is undefined
    at::Tensor memory;  // the elements, flattened, for a reader over tensors in memory
  };
  struct Saved {
    std::vector<int64_t> shape;
    at::ScalarType dtype = at::kFloat;
    std::vector<Piece> pieces;  // by offset
    std::string where;          // the file (or files) that hold it, for errors
  };
  void add_file(const std::string& path);
  void check_pieces();  // sorts each tensor's pieces, then checks them
  std::vector<TensorFileIndex> files_;
  std::map<std::string, Saved> tensors_;
};

}  // namespace vimo::checkpoints
