// The first CUDA source of vimo: lists visible devices and runs a tiny kernel on each to prove the
// sm_80/sm_90 code we ship loads. The fused loss kernels (their own issue) will live beside it.
#include <cuda_runtime.h>

#include <cstdio>
#include <string>

#include "kernels/cuda/cuda_probe.h"

namespace vimo::kernels {
namespace {

__global__ void write_lane_ids(int* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = i;
}

std::string error_text(cudaError_t status) { return cudaGetErrorString(status); }

// Runs write_lane_ids on the current device and checks the result; empty string on success.
std::string run_probe_kernel() {
  constexpr int n = 256;
  int* device_buffer = nullptr;
  cudaError_t status = cudaMalloc(&device_buffer, n * sizeof(int));
  if (status != cudaSuccess) return "cudaMalloc: " + error_text(status);
  write_lane_ids<<<(n + 127) / 128, 128>>>(device_buffer, n);
  status = cudaGetLastError();  // a launch that failed (no kernel image for this device) says so here
  if (status != cudaSuccess) {
    cudaFree(device_buffer);
    return "launch: " + error_text(status);
  }
  int host[n] = {};
  status = cudaMemcpy(host, device_buffer, sizeof(host), cudaMemcpyDeviceToHost);
  cudaFree(device_buffer);
  if (status != cudaSuccess) return "kernel: " + error_text(status);
  for (int i = 0; i < n; ++i) {
    if (host[i] != i) return "kernel wrote wrong values";
  }
  return "";
}

}  // namespace

std::string describe_cuda_devices() {
  int runtime = 0, driver = 0, count = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);
  char head[128];
  std::snprintf(head, sizeof(head), "CUDA runtime %d.%d, driver %d.%d", runtime / 1000, (runtime % 1000) / 10,
                driver / 1000, (driver % 1000) / 10);
  std::string text = head;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    return text + ", no usable device (" + (status != cudaSuccess ? error_text(status) : "0 devices") + ")";
  }
  text += ", " + std::to_string(count) + " devices:";
  // The probe visits each device; the caller's current device must be current again afterwards (work the
  // caller launches next, and device synchronizes, go to the current device).
  int current = 0;
  cudaGetDevice(&current);
  for (int device = 0; device < count; ++device) {
    cudaDeviceProp properties{};
    cudaError_t device_status = cudaGetDeviceProperties(&properties, device);
    if (device_status == cudaSuccess) device_status = cudaSetDevice(device);
    if (device_status != cudaSuccess) {
      text += " device " + std::to_string(device) + " (unusable: " + error_text(device_status) + ")";
      continue;
    }
    const std::string probe = run_probe_kernel();
    text += std::string(" ") + properties.name + " (sm_" + std::to_string(properties.major) +
            std::to_string(properties.minor) +
            (probe.empty() ? ", kernel ok)" : ", kernel FAILED: " + probe + ")");
  }
  cudaSetDevice(current);
  return text;
}

}  // namespace vimo::kernels
