// Defines the NCCL backend of vimo::comm::Communicator for CUDA tensors. Only built when CUDA is enabled
// (VIMO_HAVE_CUDA); the unique id travels over a bootstrap communicator (MPI today, rendezvous later).
#pragma once

#include "comm/communicator.h"

namespace vimo::comm {

// Creates an NCCL communicator with the same ranks as `bootstrap`, on CUDA device `device`.
// Blocking collectives and send/recv are enqueued on the caller's current CUDA stream (so they return before
// the GPU ran them and cannot time out on the host). Asynchronous ones run on the communicator's own stream
// after the work already queued on the caller's; their Work::wait blocks the host until they finished (or
// aborts the communicator after the timeout) and then orders the caller's stream after them. NCCL has no
// message tags: send/recv ignore `tag`, and messages between two ranks arrive in the order sent.
std::shared_ptr<Communicator> make_nccl_communicator(Communicator& bootstrap, int device);

// "2.27.7" style version of the NCCL library linked in.
std::string nccl_library_version();

}  // namespace vimo::comm
