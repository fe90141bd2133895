// Implements JobWatch (see job_watch.h).
#include "trainer/job_watch.h"

#include <unistd.h>

#include <chrono>
#include <string>

namespace vimo::trainer {

namespace {

std::string host_name() {
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0) return "unknown-host";
  return name;
}

std::chrono::milliseconds milliseconds(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000.0));
}

}  // namespace

JobWatch::JobWatch(const std::shared_ptr<comm::Communicator>& comm, double timeout_s, double heartbeat_s)
    : comm_(comm) {
  store_ = comm::start_job_store(*comm_);
  comm::WatchdogOptions options;
  options.rank = comm_->rank();
  options.world_size = comm_->size();
  options.host = host_name();
  options.store_host = store_->host;
  options.store_port = store_->port;
  options.token = store_->token;
  options.heartbeat_interval = milliseconds(heartbeat_s);
  options.timeout = milliseconds(timeout_s);
  // A rank inside one collective for longer than the collective timeout is stuck on its own account; keep it
  // well above the peer timeout so that a missing peer, the usual cause, is what gets reported.
  options.collective_timeout = std::max(milliseconds(10 * timeout_s), comm_->timeout());
  comm::apply_watchdog_environment(options);
  watchdog_ = std::make_unique<comm::Watchdog>(options);
  comm::set_collective_observer(watchdog_.get());
}

void JobWatch::finish() {
  if (!watchdog_) return;
  comm::set_collective_observer(nullptr);
  watchdog_->stop();
  comm_->barrier();  // every rank has marked itself finished: rank 0 may close the store
  watchdog_.reset();
  store_.reset();
}

JobWatch::~JobWatch() {
  if (watchdog_) comm::set_collective_observer(nullptr);
}

}  // namespace vimo::trainer
