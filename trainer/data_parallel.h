// Defines the data-parallel pieces of the training loop besides gradient averaging (comm::GradientReducer):
// starting replicas from rank 0's parameters, and checking that replicas stay identical.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "models/gemini_mvr.h"

namespace vimo::trainer {

// Copies rank 0's parameters to every rank.
void broadcast_parameters(models::GeminiMVR& model, const std::shared_ptr<comm::Communicator>& comm);

// Throws (naming the rank and step) unless every rank holds bitwise the same parameters.
void check_replicas_agree(models::GeminiMVR& model, const std::shared_ptr<comm::Communicator>& comm,
                          int64_t step);

}  // namespace vimo::trainer
