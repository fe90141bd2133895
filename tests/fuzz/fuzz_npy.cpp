// libFuzzer target for the .npy parser (data/npy.cpp): any input must either parse into an array whose
// byte count matches its shape, or throw NpyError; never crash, read out of bounds or allocate beyond the
// input's size. Built standalone by tests/fuzz/run_fuzz.sh (clang -fsanitize=fuzzer,address).
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "data/npy.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const vimo::data::NpyArray array = vimo::data::parse_npy(data, size, "fuzz.npy");
    const size_t expected = static_cast<size_t>(array.numel()) * vimo::data::npy_dtype_size(array.dtype);
    if (array.data.size() != expected || array.data.size() > size) std::abort();
    if (!array.data.empty()) (void)array.to_floats();
  } catch (const vimo::data::NpyError&) {
  }
  return 0;
}
