// Defines the data-parallel pieces of the training loop: averaging gradients over the DP ranks, starting
// replicas from rank 0's parameters, and checking that replicas stay identical.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "models/gemini_mvr.h"

namespace vimo::trainer {

// Averages the gradients of `params` over all ranks in one flat all-reduce; a parameter without a gradient
// counts as zero. (The bucketed reducer overlapped with backward is the communication issue's.)
void average_gradients(const std::vector<at::Tensor>& params,
                       const std::shared_ptr<comm::Communicator>& comm);

// Copies rank 0's parameters to every rank.
void broadcast_parameters(models::GeminiMVR& model, const std::shared_ptr<comm::Communicator>& comm);

// Throws (naming the rank and step) unless every rank holds bitwise the same parameters.
void check_replicas_agree(models::GeminiMVR& model, const std::shared_ptr<comm::Communicator>& comm,
                          int64_t step);

}  // namespace vimo::trainer
