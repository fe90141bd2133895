// Tests of comm::Watchdog: several in-process "ranks", each a Watchdog whose failures are recorded instead of
// ending the process, against one StoreServer. The multi-process cases (a rank SIGKILLed or SIGSTOPped under
// mpirun) are tests/e2e/watchdog_kill.sh and watchdog_stop.sh.
#include <gtest/gtest.h>

#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "comm/store.h"
#include "comm/watchdog.h"

namespace vimo::comm {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using Kind = WatchdogFailure::Kind;

constexpr auto kInterval = 50ms;
constexpr auto kTimeout = 600ms;
// How late a report may come past the timeout: Note [Heartbeats] promises timeout + 2 intervals; the rest is
// slack for a loaded machine (two cores shared by everything).
constexpr auto kLateness = 2 * kInterval + 400ms;

// The failures each rank reported, and when.
struct Recorder {
  std::mutex mutex;
  std::map<int, WatchdogFailure> failures;  // rank -> its failure
  std::map<int, Clock::time_point> when;

  size_t count() {
    std::lock_guard lock(mutex);
    return failures.size();
  }
};

class WatchdogTest : public ::testing::Test {
 protected:
  WatchdogTest() : server_(std::make_unique<StoreServer>(server_options())) {}
  ~WatchdogTest() override { ranks_.clear(); }  // before the server

  static StoreServerOptions server_options() {
    StoreServerOptions o;
    o.host = "127.0.0.1";
    o.token = "watchdog-test";
    return o;
  }

  WatchdogOptions options(int rank, int world_size) {
    WatchdogOptions o;
    o.rank = rank;
    o.world_size = world_size;
    o.host = "host-" + std::to_string(rank);
    o.store_host = "127.0.0.1";
    o.store_port = server_->port();
    o.token = "watchdog-test";
    o.heartbeat_interval = kInterval;
    o.timeout = kTimeout;
    o.on_failure = [this, rank](const WatchdogFailure& f) {
      std::lock_guard lock(recorder_.mutex);
      recorder_.failures[rank] = f;
      recorder_.when[rank] = Clock::now();
    };
    return o;
  }

  void start_ranks(int world_size, std::chrono::milliseconds collective_timeout = 60s) {
    for (int r = 0; r < world_size; ++r) {
      WatchdogOptions o = options(r, world_size);
      o.collective_timeout = collective_timeout;
      ranks_.push_back(std::make_unique<Watchdog>(std::move(o)));
    }
  }

  // Polls until `count` ranks have reported or `limit` passes; returns whether they did.
  bool wait_for_reports(size_t count, std::chrono::milliseconds limit) {
    const auto deadline = Clock::now() + limit;
    while (recorder_.count() < count && Clock::now() < deadline) std::this_thread::sleep_for(5ms);
    return recorder_.count() >= count;
  }

  std::unique_ptr<StoreServer> server_;
  std::vector<std::unique_ptr<Watchdog>> ranks_;
  Recorder recorder_;
};

TEST_F(WatchdogTest, HealthyRanksReportNothingAndFinishedRanksAreNotMissed) {
  start_ranks(3);
  for (int step = 0; step < 10; ++step) {
    for (auto& w : ranks_) w->enter_collective("allreduce", 16);
    std::this_thread::sleep_for(10ms);
    for (auto& w : ranks_) w->leave_collective();
  }
  ranks_[1]->stop();  // rank 0 watched rank 1: it must move on to rank 2, not report rank 1
  const int64_t sent = ranks_[0]->heartbeats_sent();
  std::this_thread::sleep_for(kTimeout + kLateness);
  EXPECT_EQ(recorder_.count(), 0u) << recorder_.failures.begin()->second.message;
  EXPECT_GT(ranks_[0]->heartbeats_sent(), sent + 5);
  EXPECT_EQ(ranks_[2]->describe_activity(), "last finished allreduce #10 of 16 B");
}

TEST_F(WatchdogTest, AStoppedRankIsReportedByEveryOtherWithItsHostAndLastCollective) {
  start_ranks(4);
  for (auto& w : ranks_) {
    w->enter_collective("allreduce", int64_t{4} << 20);
    w->leave_collective();
  }
  for (int r = 0; r < 4; ++r) {
    if (r != 2) ranks_[r]->enter_collective("allreduce", int64_t{4} << 20);  // #2, waiting for rank 2
  }
  std::this_thread::sleep_for(3 * kInterval);  // rank 2's "finished #1" heartbeat reaches the store
  const auto paused_at = Clock::now();
  ranks_[2]->pause_heartbeats();  // as SIGSTOP would

  ASSERT_TRUE(wait_for_reports(3, kTimeout + kLateness + 2s));
  std::lock_guard lock(recorder_.mutex);
  EXPECT_EQ(recorder_.failures.count(2), 0u) << "the paused rank reported: " << recorder_.failures[2].message;
  for (int r : {0, 1, 3}) {
    const WatchdogFailure& f = recorder_.failures[r];
    SCOPED_TRACE(f.message);
    EXPECT_EQ(f.missing_rank, 2);
    // Rank 1 watches rank 2 (Note [Heartbeats]); the others read what it published.
    EXPECT_EQ(f.kind, r == 1 ? Kind::MissingPeer : Kind::ReportedByPeer);
    const std::string head =
        "vimo watchdog [rank " + std::to_string(r) + " on host-" + std::to_string(r) + "]: ";
    EXPECT_EQ(f.message.rfind(head, 0), 0u);
    EXPECT_NE(f.message.find("rank 2 (host host-2) sent no heartbeat for"), std::string::npos);
    EXPECT_NE(
        f.message.find("; its last collective: allreduce #1 of 4.0 MiB, finished at its last heartbeat"),
        std::string::npos);
    EXPECT_NE(f.message.find("this rank is in allreduce #2 of 4.0 MiB for"), std::string::npos);
    EXPECT_NE(f.message.find("HINT: "), std::string::npos);
    const auto after = recorder_.when[r] - paused_at;
    EXPECT_GE(after, kTimeout - kInterval) << "reported before the timeout";
    EXPECT_LE(after, kTimeout + kLateness) << "reported late";
  }
}

TEST_F(WatchdogTest, ACollectiveStuckOnThisRankIsReported) {
  start_ranks(2, /*collective_timeout=*/300ms);
  ranks_[1]->enter_collective("broadcast", 8);
  ranks_[1]->leave_collective();
  ranks_[1]->enter_collective("allgather", 2048);  // never left
  ASSERT_TRUE(wait_for_reports(2, 300ms + kLateness + 2s));
  std::lock_guard lock(recorder_.mutex);
  const WatchdogFailure& stuck = recorder_.failures[1];
  EXPECT_EQ(stuck.kind, Kind::StuckCollective);
  EXPECT_EQ(stuck.missing_rank, 1);
  EXPECT_NE(stuck.message.find("this rank has been in allgather #2 of 2.0 KiB for"), std::string::npos)
      << stuck.message;
  EXPECT_NE(stuck.message.find("over its collective timeout of 0.3 s"), std::string::npos) << stuck.message;
  EXPECT_EQ(recorder_.failures[0].kind, Kind::ReportedByPeer) << recorder_.failures[0].message;
  EXPECT_NE(recorder_.failures[0].message.find("; found by rank 1; this rank is in no collective yet"),
            std::string::npos);
}

TEST_F(WatchdogTest, ALostStoreIsReportedNamingItsEndpointAndRankZero) {
  start_ranks(3);
  std::this_thread::sleep_for(3 * kInterval);
  const std::string endpoint = "127.0.0.1:" + std::to_string(server_->port());
  const auto lost_at = Clock::now();
  server_.reset();  // rank 0's process died, and its store with it
  // Rank 0's watchdog lives on here (in a real job it dies with the store); every rank reports the loss.
  ASSERT_TRUE(wait_for_reports(3, kTimeout + kLateness + 2s));
  std::lock_guard lock(recorder_.mutex);
  for (auto& [rank, f] : recorder_.failures) {
    SCOPED_TRACE(f.message);
    EXPECT_EQ(f.kind, Kind::StoreLost);
    EXPECT_EQ(f.missing_rank, 0);
    EXPECT_NE(
        f.message.find("the rendezvous store at " + endpoint + ", which rank 0 serves, has not answered"),
        std::string::npos);
    // The operation timeout is a quarter of the timeout, so a loss is seen within about 1.25 timeouts.
    EXPECT_LE(recorder_.when[rank] - lost_at, kTimeout + kTimeout / 4 + kLateness);
  }
}

TEST_F(WatchdogTest, EnvironmentOverridesAreReadAndCheckedByName) {
  WatchdogOptions o;
  ::setenv(watchdog_env::kWatchdogTimeoutS, "2.5", 1);
  ::setenv(watchdog_env::kHeartbeatIntervalS, "0.25", 1);
  apply_watchdog_environment(o);
  EXPECT_EQ(o.timeout, 2500ms);
  EXPECT_EQ(o.heartbeat_interval, 250ms);
  ::setenv(watchdog_env::kCollectiveTimeoutS, "soon", 1);
  try {
    apply_watchdog_environment(o);
    ADD_FAILURE() << "a malformed value was accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("VIMO_WATCHDOG_COLLECTIVE_TIMEOUT_S='soon'"), std::string::npos);
  }
  ::unsetenv(watchdog_env::kWatchdogTimeoutS);
  ::unsetenv(watchdog_env::kHeartbeatIntervalS);
  ::unsetenv(watchdog_env::kCollectiveTimeoutS);
}

}  // namespace
}  // namespace vimo::comm
