// Defines the NCCL backend of vimo::comm::Communicator for CUDA tensors. Only built when CUDA is enabled
// (VIMO_HAVE_CUDA); the unique id travels over a bootstrap communicator (MPI today, rendezvous later).
#pragma once

#include "comm/communicator.h"

namespace vimo::comm {

// Creates an NCCL communicator with the same ranks as `bootstrap`, on CUDA device `device`.
// Collectives run on the caller's current CUDA stream.
std::shared_ptr<Communicator> make_nccl_communicator(Communicator& bootstrap, int device);

// "2.27.7" style version of the NCCL library linked in.
std::string nccl_library_version();

}  // namespace vimo::comm
