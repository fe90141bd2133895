// Defines a query of the CUDA devices visible to this process, from the CUDA runtime that vimo's
// kernels are built against. Only compiled when CUDA is enabled (VIMO_HAVE_CUDA).
#pragma once

#include <string>

namespace vimo::kernels {

// "CUDA runtime 13.0, driver 13.0, 8 devices: NVIDIA H100 80GB HBM3 (sm_90), ..." or the reason none is
// usable.
std::string describe_cuda_devices();

}  // namespace vimo::kernels
