# Finds every dependency once and exposes it as an imported target for the folders' libraries.
# LibTorch comes from the pinned PyPI wheel that scripts/setup.sh installs (see Note [Torch pin] there).

if(NOT VIMO_TORCH_PREFIX)
  message(FATAL_ERROR "VIMO_TORCH_PREFIX is not set. HINT: run scripts/build.sh, which calls scripts/setup.sh "
                      "and passes the wheel's CMake prefix, or pass -DVIMO_TORCH_PREFIX=<site-packages>/torch/share/cmake")
endif()
list(APPEND CMAKE_PREFIX_PATH "${VIMO_TORCH_PREFIX}")

# libtorch_cuda.so (linked by every CUDA wheel build, even CPU-only ones of ours) needs the CUDA libraries
# the wheel installed under site-packages/nvidia: the linker must find those, not older system copies.
get_filename_component(_site_packages "${VIMO_TORCH_PREFIX}/../../.." ABSOLUTE)
file(GLOB _wheel_cuda_libs LIST_DIRECTORIES true ${_site_packages}/nvidia/*/lib ${_site_packages}/nvidia/cu13/lib)
foreach(dir ${_wheel_cuda_libs})
  add_link_options("LINKER:-rpath-link,${dir}")
endforeach()

# CUDA decision: our kernels' CUDA major must equal the one LibTorch was built with (VIMO_TORCH_CUDA).
set(VIMO_HAVE_CUDA OFF)
if(NOT VIMO_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER AND VIMO_TORCH_CUDA)
    enable_language(CUDA)
    string(REGEX MATCH "^[0-9]+" _nvcc_major "${CMAKE_CUDA_COMPILER_VERSION}")
    string(REGEX MATCH "^[0-9]+" _torch_major "${VIMO_TORCH_CUDA}")
    if(NOT _nvcc_major STREQUAL _torch_major)
      message(FATAL_ERROR "nvcc is CUDA ${CMAKE_CUDA_COMPILER_VERSION} but LibTorch was built with CUDA "
                          "${VIMO_TORCH_CUDA}: the majors must match. HINT: pick a torch pin for CUDA ${_nvcc_major} "
                          "(VIMO_TORCH_VERSION) or configure with -DVIMO_CUDA=OFF.")
    endif()
    set(VIMO_HAVE_CUDA ON)
  elseif(VIMO_CUDA STREQUAL "ON")
    message(FATAL_ERROR "VIMO_CUDA=ON but nvcc (${CMAKE_CUDA_COMPILER}) or a CUDA LibTorch (${VIMO_TORCH_CUDA}) is missing")
  endif()
endif()

if(VIMO_HAVE_CUDA)
  set(CMAKE_CUDA_STANDARD 17)  # .cu files include no LibTorch headers; CMake 3.25 knows no CUDA20 flags for nvcc
  find_package(CUDAToolkit REQUIRED)
  # LibTorch's CMake config looks for the CUDA libraries the wheel ships under site-packages/nvidia.
  # LibTorch's CMake ignores CMAKE_CUDA_ARCHITECTURES and adds -gencode flags from TORCH_CUDA_ARCH_LIST.
  set(TORCH_CUDA_ARCH_LIST "8.0;9.0")
  set(CMAKE_CUDA_ARCHITECTURES OFF)
  find_package(Torch REQUIRED)
  # Note [One NCCL]: a process loads one libnccl.so.2, and libtorch_cuda needs the (newer) one its wheel
  # ships (site-packages/nvidia/nccl). So we compile and link against that one too, and tell the linker
  # where libtorch_cuda's own CUDA dependencies live; the toolkit's NCCL is only the fallback.
  find_path(NCCL_INCLUDE_DIR nccl.h HINTS ${_site_packages}/nvidia/nccl/include NO_DEFAULT_PATH)
  find_library(NCCL_LIBRARY NAMES nccl libnccl.so.2 HINTS ${_site_packages}/nvidia/nccl/lib NO_DEFAULT_PATH)
  find_path(NCCL_INCLUDE_DIR nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS} /usr/local/include REQUIRED)
  find_library(NCCL_LIBRARY NAMES nccl HINTS ${CUDAToolkit_LIBRARY_DIR} /usr/local/cuda/lib /usr/local/cuda/lib64 REQUIRED)
  add_library(vimo_nccl INTERFACE)
  target_include_directories(vimo_nccl SYSTEM INTERFACE ${NCCL_INCLUDE_DIR})
  target_link_libraries(vimo_nccl INTERFACE ${NCCL_LIBRARY} CUDA::cudart)
  file(STRINGS "${NCCL_INCLUDE_DIR}/nccl.h" _nccl_ver REGEX "#define NCCL_(MAJOR|MINOR|PATCH) ")
  string(REGEX REPLACE ".*NCCL_MAJOR ([0-9]+).*NCCL_MINOR ([0-9]+).*NCCL_PATCH ([0-9]+).*" "\\1.\\2.\\3" VIMO_NCCL_VERSION "${_nccl_ver}")
  set(VIMO_CUDA_STATUS "enabled (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, LibTorch CUDA ${VIMO_TORCH_CUDA}, NCCL ${VIMO_NCCL_VERSION}, archs sm_80 sm_90)")
else()
  # A CUDA wheel's CMake config still probes CUDA; a fixed arch list keeps it from try_run-ing GPU detection.
  set(TORCH_CUDA_ARCH_LIST "8.0;9.0")
  set(CMAKE_CUDA_STANDARD 17)
  find_package(Torch REQUIRED)
  set(VIMO_NCCL_VERSION "none")
  set(VIMO_CUDA_STATUS "disabled: CPU-only build (no nvcc or no CUDA LibTorch found, or VIMO_CUDA=OFF)")
endif()

# The C++ ABI must match the wheel's (_GLIBCXX_USE_CXX11_ABI), or every std::string crossing into LibTorch breaks.
# Recent wheels leave TORCH_CXX_FLAGS empty (the new ABI is implied), so the flag is set from the wheel's own
# answer (torch._C._GLIBCXX_USE_CXX11_ABI, read by scripts/setup.sh) and checked against LibTorch's if it has one.
if(NOT DEFINED VIMO_TORCH_CXX11_ABI)
  message(FATAL_ERROR "VIMO_TORCH_CXX11_ABI is not set. HINT: configure through scripts/build.sh")
endif()
if(TORCH_CXX_FLAGS MATCHES "_GLIBCXX_USE_CXX11_ABI=([01])" AND NOT CMAKE_MATCH_1 STREQUAL VIMO_TORCH_CXX11_ABI)
  message(FATAL_ERROR "LibTorch flags '${TORCH_CXX_FLAGS}' disagree with the wheel's ABI flag ${VIMO_TORCH_CXX11_ABI}")
endif()
add_compile_definitions(_GLIBCXX_USE_CXX11_ABI=${VIMO_TORCH_CXX11_ABI})
# Note [LibTorch's bundled fmt]: the wheel's include/ carries fmt 12 headers, which would shadow Debian's fmt
# (that spdlog is built against) and leave fmt calls unresolved at link time. LibTorch's public headers we use
# do not include fmt, so we expose a copy of include/ without fmt/ (symlinks) instead of the original.
set(VIMO_TORCH_INCLUDE "${CMAKE_BINARY_DIR}/torch_include")
file(MAKE_DIRECTORY "${VIMO_TORCH_INCLUDE}")
set(_torch_include_dirs)
foreach(dir ${TORCH_INCLUDE_DIRS})
  if(EXISTS "${dir}/fmt/format.h")
    file(GLOB _entries RELATIVE "${dir}" "${dir}/*")
    foreach(entry ${_entries})
      if(NOT entry STREQUAL "fmt" AND NOT EXISTS "${VIMO_TORCH_INCLUDE}/${entry}")
        file(CREATE_LINK "${dir}/${entry}" "${VIMO_TORCH_INCLUDE}/${entry}" SYMBOLIC)
      endif()
    endforeach()
    list(APPEND _torch_include_dirs "${VIMO_TORCH_INCLUDE}")
  else()
    list(APPEND _torch_include_dirs "${dir}")
  endif()
endforeach()
foreach(target torch torch_library torch_cpu torch_cpu_library torch_cuda torch_cuda_library c10 c10_cuda)
  if(TARGET ${target})
    set_property(TARGET ${target} PROPERTY INTERFACE_INCLUDE_DIRECTORIES "")
  endif()
endforeach()
add_library(vimo_torch INTERFACE)
target_link_libraries(vimo_torch INTERFACE ${TORCH_LIBRARIES})
target_include_directories(vimo_torch SYSTEM INTERFACE ${_torch_include_dirs})
separate_arguments(_torch_flags UNIX_COMMAND "${TORCH_CXX_FLAGS}")
target_compile_options(vimo_torch INTERFACE $<$<COMPILE_LANGUAGE:CXX>:${_torch_flags}>)

find_package(MPI REQUIRED COMPONENTS CXX)
find_package(yaml-cpp REQUIRED)
find_package(fmt REQUIRED)
find_package(spdlog REQUIRED)
find_package(CLI11 REQUIRED)
find_package(nlohmann_json REQUIRED)
find_package(Threads REQUIRED)
find_package(PkgConfig REQUIRED)
pkg_check_modules(XXHASH REQUIRED IMPORTED_TARGET libxxhash)
pkg_check_modules(ZSTD REQUIRED IMPORTED_TARGET libzstd)
pkg_check_modules(SENTENCEPIECE REQUIRED IMPORTED_TARGET sentencepiece)  # libsentencepiece-dev: caption tokenizer
if(VIMO_TESTS)
  find_package(GTest REQUIRED)
endif()
if(VIMO_BENCH)
  find_package(benchmark REQUIRED)
endif()
