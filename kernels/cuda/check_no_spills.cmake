# Fails when ptxas reports a register spill to local memory in any kernel of a CUDA source.
#   cmake -DNVCC=<nvcc> -DSOURCE=<file.cu> -DINCLUDE_DIR=<repo root> -DARCHS="80;90" -DWORK_DIR=<dir>
#         -P kernels/cuda/check_no_spills.cmake
#
# Note [No local-memory spills]
# A spill moves registers to local memory (per-thread DRAM behind L1): in a bandwidth-bound element kernel
# it silently adds memory traffic. The build already compiles kernels/cuda/fused_contrastive.cu with
# `-Xptxas=-warn-spills,-Werror`, so a spill fails the build. This script is the independent, readable check
# behind it (a ctest, so CI reports it by name): it compiles the source for each architecture with
# `-Xptxas=-v`, which prints for every entry function
#     ptxas info : Compiling entry function '<mangled>' for 'sm_90'
#     ptxas info : Function properties for <mangled>
#         0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
# and requires (1) nvcc to succeed, (2) at least one entry function per architecture, (3) one
# "spill stores, spill loads" line per entry function (so a change in ptxas's wording fails loudly instead of
# passing with nothing parsed), and (4) every one of them to read 0 and 0. Device functions that are not
# inlined get their own properties line too and are checked the same way.
foreach(var NVCC SOURCE INCLUDE_DIR ARCHS WORK_DIR)
  if(NOT ${var})
    message(FATAL_ERROR "check_no_spills.cmake: -D${var}=... is required")
  endif()
endforeach()

get_filename_component(source_name ${SOURCE} NAME_WE)  # checks of several sources may share WORK_DIR
foreach(arch ${ARCHS})
  execute_process(
    COMMAND ${NVCC} -std=c++17 -I${INCLUDE_DIR} -arch=sm_${arch} -cubin -Xptxas=-v
            -o ${WORK_DIR}/${source_name}_sm_${arch}.cubin ${SOURCE}
    RESULT_VARIABLE status OUTPUT_VARIABLE stdout ERROR_VARIABLE stderr)
  set(report "${stdout}${stderr}")
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "nvcc failed for sm_${arch} (${status}):\n${report}")
  endif()
  string(REGEX MATCHALL "Compiling entry function '[^']+' for 'sm_${arch}'" entries "${report}")
  string(REGEX MATCHALL "[0-9]+ bytes spill stores, [0-9]+ bytes spill loads" spills "${report}")
  list(LENGTH entries entry_count)
  list(LENGTH spills spill_count)
  if(entry_count EQUAL 0 OR spill_count LESS entry_count)
    message(FATAL_ERROR "sm_${arch}: found ${entry_count} entry functions and ${spill_count} spill reports in "
                        "ptxas -v output; expected one report per function. HINT: did ptxas change its "
                        "wording? Output:\n${report}")
  endif()
  foreach(line ${spills})
    if(NOT line MATCHES "^0 bytes spill stores, 0 bytes spill loads$")
      message(FATAL_ERROR "sm_${arch}: ${line} in ${SOURCE}. HINT: reduce live registers (smaller per-thread "
                          "tiles, fewer unrolled values) or raise __launch_bounds__; full report:\n${report}")
    endif()
  endforeach()
  message(STATUS "sm_${arch}: ${entry_count} kernels, ${spill_count} spill reports, all 0 bytes")
endforeach()
