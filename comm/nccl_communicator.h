// Defines the NCCL backend of vimo::comm::Communicator for CUDA tensors. Only built when CUDA is enabled
// (VIMO_HAVE_CUDA). The unique id that names a communicator travels over a bootstrap communicator (MPI) or
// the job's rendezvous store (torchrun, srun: no MPI needed); split() makes one communicator per group.
#pragma once

#include <memory>
#include <string>

#include "comm/communicator.h"

namespace vimo::comm {

class StoreClient;

// Creates an NCCL communicator with the same ranks as `bootstrap`, on CUDA device `device` (made the
// calling thread's current device). A collective over `bootstrap`: rank 0 draws the unique id and broadcasts
// it, after every rank learned that all of them selected their GPU (else every rank throws, the others naming
// the first rank that failed).
//
// Every NCCL communicator is non-blocking (Note [Non-blocking NCCL communicators] in nccl_init.cpp):
// creating it, splitting it and enqueueing a call fail after its timeout (default_collective_timeout() when
// it is made) instead of hanging, aborting it. Blocking collectives and send/recv are enqueued on the
// caller's current CUDA stream (so they return before the GPU ran them and cannot time out on the host once
// enqueued). Asynchronous ones run on the communicator's own stream after the work already queued on the
// caller's; their Work::wait blocks the host until they finished (or aborts the communicator after the
// timeout) and then orders the caller's stream after them, reporting the wait to the CollectiveObserver as
// the other backends do; an enqueue that waits (NCCL connects to the peers on a communicator's first calls)
// is reported too, as its call. The checks
// and error messages of a call's arguments are the other backends' (comm/collective_call.h), but the ranks do
// not agree on a call before it runs. NCCL has no message tags: send/recv check `tag` as the other backends
// do (0 or more) and then ignore it, and messages between two ranks arrive in the order sent. split() follows
// Communicator::split (ncclCommSplit, plus one small all-reduce so that a negative color fails on every
// rank).
std::shared_ptr<Communicator> make_nccl_communicator(Communicator& bootstrap, int device);

// The same communicator without MPI: `size` ranks, each calling this with its own `rank`, a StoreClient of
// the job's store made with that rank (connect_job_store in comm/job_store.h), and the same `key`, unique
// to this communicator in the job ("nccl/world"). Rank 0 publishes the unique id under `key` and the others
// fetch it, after every rank learned through the store whether all of them prepared their GPU; see
// exchange_unique_id in comm/job_store.h for the errors (a failed rank is named on every rank; a rank that
// never comes is named after default_collective_timeout()).
std::shared_ptr<Communicator> make_nccl_communicator(StoreClient& store, const std::string& key, int rank,
                                                     int size, int device);

// "2.27.7" style version of the NCCL library linked in.
std::string nccl_library_version();

}  // namespace vimo::comm
