// Defines the Gemini-MVR training loop for one stage (action, object or router): data-parallel over the
// communicator, AdamW with warmup-cosine and clipping, checkpoints with exact resume, and held-out
// retrieval metrics at the end.
#pragma once

#include <memory>
#include <string>

#include "comm/communicator.h"
#include "trainer/config.h"
#include "trainer/preemption.h"
#include "trainer/retrieval_eval.h"

namespace vimo::trainer {

struct TrainResult {
  int64_t last_step = 0;
  double last_loss = 0;
  bool stopped_early = false;  // train.stop_after was reached
  bool preempted = false;      // stopped by SIGTERM / SIGUSR1 after saving (trainer/preemption.h)
  RetrievalMetrics test;       // held-out metrics (empty when stopped early)
};

// Runs (or with `resume`, continues from the newest valid checkpoint under train.out_dir) one stage.
// Collective over `comm` (null = one process). Rank 0 prints progress. `preemption`: the process's handlers,
// installed before MPI starts (trainer/main.cpp); null installs them for the call.
TrainResult train_retriever(const Config& config, bool resume,
                            const std::shared_ptr<comm::Communicator>& comm,
                            const PreemptionSignals* preemption = nullptr);

}  // namespace vimo::trainer
