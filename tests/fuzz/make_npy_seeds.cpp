// Writes a seed corpus of valid .npy files (every dtype, versions 1.0-3.0, Fortran order, 0-d and empty
// arrays) into the directory given as argv[1], for the fuzz_npy target.
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "data/npy.h"

namespace {

void save(const std::string& dir, const std::string& name, const std::string& bytes) {
  std::FILE* file = std::fopen((dir + "/" + name).c_str(), "wb");
  if (!file || std::fwrite(bytes.data(), 1, bytes.size(), file) != bytes.size()) {
    std::perror(name.c_str());
    std::exit(1);
  }
  std::fclose(file);
}

// A file with a hand-written header (NumPy's layout) and `data` bytes.
std::string assemble(int major, const std::string& dict, const std::string& data) {
  std::string header = dict;
  const size_t prefix = major == 1 ? 10 : 12;
  header.append(64 - (prefix + header.size() + 1) % 64, ' ');
  header += '\n';
  std::string out = std::string("\x93NUMPY", 6) + static_cast<char>(major) + '\0';
  for (size_t i = 0; i < prefix - 8; ++i) out += static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return out + header + data;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s SEED_DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  using vimo::data::npy_bytes;
  save(dir, "f4_2x3.npy", npy_bytes({2, 3}, std::vector<float>{1, 2, 3, 4, 5, 6}));
  save(dir, "i8_4.npy", npy_bytes({4}, std::vector<int64_t>{-1, 0, 1, 1LL << 40}));
  save(dir, "f4_scalar.npy", npy_bytes({}, std::vector<float>{3.5f}));
  save(dir, "f4_empty.npy", npy_bytes({0, 263}, std::vector<float>{}));
  save(dir, "f8_v2.npy",
       assemble(2, "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }",
                std::string("\0\0\0\0\0\0\xf0\x3f\0\0\0\0\0\0\0\x40", 16)));
  save(dir, "f2_v3.npy",
       assemble(3, "{'descr': '<f2', 'fortran_order': False, 'shape': (2,), }",
                std::string("\x00\x3c\x00\xc1", 4)));
  save(dir, "i4_fortran.npy",
       assemble(1, "{'descr': '<i4', 'fortran_order': True, 'shape': (2, 2), }",
                std::string("\1\0\0\0\3\0\0\0\2\0\0\0\4\0\0\0", 16)));
  save(dir, "u1.npy", assemble(1, "{'descr': '|u1', 'fortran_order': False, 'shape': (3,), }", "abc"));
  save(dir, "b1.npy",
       assemble(1, "{\"descr\": \"|b1\", \"shape\": (1L, 2L), \"fortran_order\": False}",
                std::string("\1\0", 2)));
  return 0;
}
