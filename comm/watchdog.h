// Defines vimo::comm::Watchdog: per-rank heartbeats over the rendezvous store that turn a dead or stopped
// rank, a lost store, or a collective stuck on this rank into a prompt exit naming the culprit, instead of a
// hang; and WatchdogOptions with its environment knobs.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "comm/communicator.h"

namespace vimo::comm {

namespace detail {
struct WatchdogActivity;  // where a rank's main thread is (watchdog.cpp)
}  // namespace detail

// Every environment variable the watchdog reads, in one place.
namespace watchdog_env {
constexpr const char* kHeartbeatIntervalS = "VIMO_HEARTBEAT_INTERVAL_S";  // seconds between heartbeats
constexpr const char* kWatchdogTimeoutS = "VIMO_WATCHDOG_TIMEOUT_S";  // a peer silent this long is missing
constexpr const char* kCollectiveTimeoutS =
    "VIMO_WATCHDOG_COLLECTIVE_TIMEOUT_S";  // this rank stuck this long
}  // namespace watchdog_env

// What the watchdog found; handed to WatchdogOptions::on_failure.
struct WatchdogFailure {
  enum class Kind {
    MissingPeer,      // a peer's heartbeat stopped advancing (this rank watched it)
    ReportedByPeer,   // another rank found a failure and published it in the store
    StoreLost,        // the store did not answer for the timeout (rank 0, which serves it, is gone)
    StuckCollective,  // this rank has been inside one collective for longer than collective_timeout
  };
  Kind kind = Kind::MissingPeer;
  int missing_rank = -1;  // the rank at fault: the silent peer, 0 for a lost store, this rank when stuck
  std::string message;    // the whole explanation, starting "vimo watchdog [rank R on HOST]: "
};

struct WatchdogOptions {
  int rank = 0;
  int world_size = 1;
  std::string host;  // this rank's host name, for the messages of its peers
  // Where the job's rendezvous store listens, and its token (see comm/job_store.h).
  std::string store_host;
  uint16_t store_port = 0;
  std::string token;
  std::chrono::milliseconds heartbeat_interval{1000};
  std::chrono::milliseconds timeout{60000};              // a peer or the store silent this long: failure
  std::chrono::milliseconds collective_timeout{600000};  // this rank inside one collective this long: failure
  int exit_code = 3;                                     // of the default on_failure
  // Called once, on the watchdog's thread, when it finds a failure; the thread ends after it returns (so it
  // must not call stop(), which joins that thread). Empty:
  // print the message to stderr, give the peers a moment to read the failure from the store (two heartbeat
  // intervals), then std::_Exit(exit_code): the main thread may be blocked in a collective that never ends.
  std::function<void(const WatchdogFailure&)> on_failure;
};

// Fills the intervals of `options` from VIMO_HEARTBEAT_INTERVAL_S, VIMO_WATCHDOG_TIMEOUT_S and
// VIMO_WATCHDOG_COLLECTIVE_TIMEOUT_S where set (positive seconds, fractions allowed), logging each override
// to stderr. Throws std::runtime_error naming the variable when a value is malformed.
void apply_watchdog_environment(WatchdogOptions& options);

// Sends this rank's heartbeat and watches a peer's (Note [Heartbeats] in watchdog.cpp) on a thread of its
// own, from construction until stop(). The main thread brackets each collective with enter_collective /
// leave_collective so the heartbeat says where this rank is, and a collective that never ends is reported.
class Watchdog final : public CollectiveObserver {
 public:
  // Connects to the store (throwing std::runtime_error as StoreClient does) and sends the first heartbeat
  // before returning, then starts the thread.
  explicit Watchdog(WatchdogOptions options);
  ~Watchdog();  // stop()
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // Called by the main thread around every collective: a few relaxed atomic stores, no lock, no system call
  // besides reading the clock. `name` must outlive the watchdog (a string literal: "allreduce").
  void enter_collective(const char* name, int64_t bytes) override;
  void leave_collective() override;

  // Ends the thread and marks this rank finished in the store, so that peers still running do not take its
  // silence for a failure. Idempotent; a failed last write is ignored (the job is ending anyway).
  void stop();

  // Heartbeats sent so far (tests).
  int64_t heartbeats_sent() const { return heartbeats_sent_.load(std::memory_order_relaxed); }
  // Stops sending heartbeats without ending the thread or marking this rank finished, as a SIGSTOPped process
  // would (tests only); resume_heartbeats() undoes it.
  void pause_heartbeats() { paused_.store(true); }
  void resume_heartbeats() { paused_.store(false); }

  // What this rank is doing, as its messages say it after "this rank ": "is in allreduce #58 of 4.0 MiB for
  // 9.8 s", "last finished allreduce #57 of 4.0 MiB", "is in no collective yet".
  std::string describe_activity() const;

  struct Session;  // the thread's connection and view of its peer (watchdog.cpp)

 private:
  void run();
  // One heartbeat round: Note [Heartbeats]. Returns the failure found, if any.
  std::optional<WatchdogFailure> beat();
  void fail(const WatchdogFailure& failure);
  detail::WatchdogActivity activity() const;
  // "vimo watchdog [rank 1 on host-a]: "
  std::string prefix() const;

  WatchdogOptions options_;
  std::unique_ptr<Session> session_;
  // The collective the main thread is in or last left (Note [Collective bookkeeping] in watchdog.cpp).
  std::atomic<uint64_t> version_{0};              // odd while the main thread writes the fields below
  std::atomic<uint64_t> collective_sequence_{0};  // number of collectives entered; 0 = none yet
  std::atomic<const char*> collective_name_{nullptr};
  std::atomic<int64_t> collective_bytes_{0};
  std::atomic<int64_t> collective_started_ns_{0};  // steady clock
  std::atomic<bool> in_collective_{false};

  std::atomic<int64_t> heartbeats_sent_{0};
  std::atomic<bool> paused_{false};
  std::atomic<bool> stop_requested_{false};
  std::mutex stop_mutex_;
  std::condition_variable stop_signal_;
  bool stopped_ = false;  // under stop_mutex_
  std::thread thread_;
};

}  // namespace vimo::comm
