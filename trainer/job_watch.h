// Defines JobWatch: hang and failure detection for one multi-rank run. It forms the job's rendezvous store
// (comm/job_store.h), runs this rank's heartbeat watchdog (comm/watchdog.h) and makes it the observer of
// every collective wait, so a dead, stopped or stuck rank ends the whole job with a message naming it.
#pragma once

#include <memory>

#include "comm/communicator.h"
#include "comm/job_store.h"
#include "comm/watchdog.h"

namespace vimo::trainer {

class JobWatch {
 public:
  // A collective over `comm`. Timeouts come from the config and VIMO_HEARTBEAT_INTERVAL_S /
  // VIMO_WATCHDOG_TIMEOUT_S / VIMO_WATCHDOG_COLLECTIVE_TIMEOUT_S, which win (and are logged).
  JobWatch(const std::shared_ptr<comm::Communicator>& comm, double timeout_s, double heartbeat_s);
  ~JobWatch();  // without finish(): stops watching (an error path; peers may then report this rank)
  JobWatch(const JobWatch&) = delete;
  JobWatch& operator=(const JobWatch&) = delete;
  // A collective at the end of a run: every rank marks itself finished, then rank 0 closes the store.
  void finish();

 private:
  std::shared_ptr<comm::Communicator> comm_;
  std::unique_ptr<comm::JobStore> store_;
  std::unique_ptr<comm::Watchdog> watchdog_;
};

}  // namespace vimo::trainer
