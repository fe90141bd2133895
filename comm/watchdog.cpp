// The heartbeat watchdog: its thread, the heartbeat record, and the wording of what it reports.
#include "comm/watchdog.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <sstream>
#include <stdexcept>

#include "comm/store.h"

namespace vimo::comm {

// Note [Heartbeats]
// Every heartbeat interval each rank's watchdog thread makes three round trips to the store, on a connection
// of its own (StoreClient calls are serialized, so sharing the main thread's would put a heartbeat behind a
// long barrier):
//   set   vimo/watchdog/hb/<rank>  "<counter> <state> <sequence> <bytes> <in_for_ms> <collective> <host>"
//   check vimo/watchdog/failure    has any rank found a failure?
//   get   vimo/watchdog/hb/<peer>  the heartbeat of the one peer this rank watches
// Ranks watch each other in a ring: rank r watches the next rank that has not finished (r+1, or r+2 when r+1
// called stop(), ...). So the store serves 3 requests per rank per interval, 3N in all, where everyone
// reading everyone would be N² (250,000 a second for 500 ranks at 1 s). The ring still sees every death: of
// any mix of dead and live ranks, some live rank watches a dead one. The rank that finds a failure publishes
// it once under vimo/watchdog/failure (the first to increment vimo/watchdog/failure_claims wins), and every
// other rank reads it at its next heartbeat: all survivors stop within timeout + 2 intervals, each naming the
// missing rank, its host and its last collective. Staleness is measured on the watcher's own steady clock
// (how long the peer's counter has not moved), so hosts' clocks need not agree, and a watcher whose own
// thread was starved for a while sees the counter moved on and does not blame the peer. The store runs inside
// rank 0: if rank 0 dies, round trips fail (or, when it is stopped, time out); after `timeout` without one
// that succeeded, each rank reports the store, and hence rank 0, as lost.
// Note [Watchdog under mpirun]
// What OpenMPI 4.1's mpirun does when one rank of a job goes away (tests/e2e/watchdog_{stop,kill}.sh, 3
// ranks, timeout 3 s, interval 0.25 s, measured from the signal until the last survivor is gone):
//   SIGSTOP  mpirun notices nothing (the process lives). The watchdog of the rank that watches the stopped
//   one
//            reports it after the timeout and exits 3; the other survivors read its report and exit 3 too
//            (about 4 s in all). The first non-zero exit makes mpirun abort the job
//            (orte_abort_on_non_zero_status, on by default: "1 process returned a non-zero exit code. Per
//            user-direction, the job has been aborted"), which kills the stopped rank as well; mpirun
//            exits 3.
//   SIGKILL  mpirun notices the death itself within a second or two ("mpirun noticed that process rank 1 ...
//            exited on signal 9 (Killed)"), kills the survivors and exits 137, before any watchdog timeout:
//            under mpirun the watchdog is the backstop for stopped or hung ranks, not for dead ones.
//            With `--mca orte_enable_recovery 1` (--enable-recovery) mpirun leaves the survivors running, as
//            a launcher that does not watch its processes would; the watchdog ends each of them with exit 3
//            and its message (about 4 s), but mpirun then exits 0 despite their statuses: do not run jobs so.
// That is why the default on_failure waits two heartbeats before exiting: mpirun's abort, set off by the
// first rank to exit, should find the others with their message already printed.
constexpr const char* kHeartbeatKeyPrefix = "vimo/watchdog/hb/";
constexpr const char* kFailureKey = "vimo/watchdog/failure";
constexpr const char* kFailureClaimsKey = "vimo/watchdog/failure_claims";

namespace {

using Clock = std::chrono::steady_clock;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

std::string describe_bytes(int64_t bytes) {
  if (bytes < 1024) return fmt::format("{} B", bytes);
  if (bytes < (int64_t{1} << 20)) return fmt::format("{:.1f} KiB", static_cast<double>(bytes) / 1024);
  if (bytes < (int64_t{1} << 30)) return fmt::format("{:.1f} MiB", static_cast<double>(bytes) / (1 << 20));
  return fmt::format("{:.1f} GiB", static_cast<double>(bytes) / (1 << 30));
}

std::string key_of(int rank) { return kHeartbeatKeyPrefix + std::to_string(rank); }

std::vector<uint8_t> bytes_of(const std::string& text) { return {text.begin(), text.end()}; }
std::string text_of(const std::vector<uint8_t>& bytes) { return {bytes.begin(), bytes.end()}; }

}  // namespace

// Where a rank's main thread is, as of one moment.
struct detail::WatchdogActivity {
  enum class State { None, In, Done, Finished } state = State::None;
  uint64_t sequence = 0;  // of the collective it is in or last left
  int64_t bytes = 0;
  int64_t in_for_ms = 0;  // how long it had been in it (State::In)
  std::string collective = "-";
};

namespace {

using Activity = detail::WatchdogActivity;

constexpr const char* kStateNames[] = {"none", "in", "done", "finished"};

// "allreduce #58 of 4.0 MiB"
std::string describe_collective(const Activity& a) {
  return fmt::format("{} #{} of {}", a.collective, a.sequence, describe_bytes(a.bytes));
}

// One rank's heartbeat record: Note [Heartbeats].
struct Heartbeat {
  int64_t counter = 0;
  Activity activity;
  std::string host = "?";

  std::string encode() const {
    std::string collective = activity.collective;  // one word, like the host (checked by the constructor)
    std::replace_if(
        collective.begin(), collective.end(), [](char c) { return c == ' ' || c == '\n'; }, '_');
    return fmt::format("{} {} {} {} {} {} {}", counter, kStateNames[static_cast<int>(activity.state)],
                       activity.sequence, activity.bytes, activity.in_for_ms, collective, host);
  }
  static std::optional<Heartbeat> decode(const std::string& text) {
    std::istringstream in(text);
    Heartbeat h;
    std::string state;
    if (!(in >> h.counter >> state >> h.activity.sequence >> h.activity.bytes >> h.activity.in_for_ms >>
          h.activity.collective >> h.host)) {
      return std::nullopt;
    }
    const auto* found = std::find(std::begin(kStateNames), std::end(kStateNames), state);
    if (found == std::end(kStateNames)) return std::nullopt;
    h.activity.state = static_cast<Activity::State>(found - std::begin(kStateNames));
    return h;
  }
};

// "its last collective: allreduce #57 of 4.0 MiB, in progress at its last heartbeat". A heartbeat is up to an
// interval old when sent, so the peer may have gone a few collectives further before it fell silent.
std::string describe_peer_activity(const Activity& a) {
  switch (a.state) {
    case Activity::State::In:
      return fmt::format("its last collective: {}, in progress at its last heartbeat",
                         describe_collective(a));
    case Activity::State::Done:
      return fmt::format("its last collective: {}, finished at its last heartbeat", describe_collective(a));
    default:
      return "its last collective: none yet";
  }
}

// Reads a positive number of seconds from `variable` into `value`, logging the override.
void read_seconds(const char* variable, std::chrono::milliseconds& value) {
  const char* text = std::getenv(variable);
  if (text == nullptr || *text == '\0') return;
  char* end = nullptr;
  const double s = std::strtod(text, &end);
  if (end == text || *end != '\0' || !(s > 0) || s > 1e7) {
    throw std::runtime_error(fmt::format("{}='{}' is not a positive number of seconds. HINT: e.g. {}=30",
                                         variable, text, variable));
  }
  const auto overridden = std::chrono::milliseconds(std::max<int64_t>(1, static_cast<int64_t>(s * 1000)));
  std::fprintf(stderr, "vimo: %s=%s overrides %.3g s\n", variable, text, value.count() / 1000.0);
  value = overridden;
}

}  // namespace

void apply_watchdog_environment(WatchdogOptions& options) {
  read_seconds(watchdog_env::kHeartbeatIntervalS, options.heartbeat_interval);
  read_seconds(watchdog_env::kWatchdogTimeoutS, options.timeout);
  read_seconds(watchdog_env::kCollectiveTimeoutS, options.collective_timeout);
}

// The watchdog thread's own state (and the constructor's, before the thread starts).
struct Watchdog::Session {
  std::unique_ptr<StoreClient> client;  // null after a failed round trip, until reconnected
  std::string store_endpoint;
  Clock::time_point last_store_success;
  std::string last_store_error;
  int64_t counter = 0;
  // The watched peer: Note [Heartbeats].
  int peer = -1;  // -1: nobody left to watch
  std::optional<Heartbeat> peer_heartbeat;
  Clock::time_point peer_last_advance;
  bool failed = false;
};

namespace {

StoreClientOptions client_options(const WatchdogOptions& o, std::chrono::milliseconds connect_timeout) {
  StoreClientOptions c;
  c.host = o.store_host;
  c.port = o.store_port;
  c.token = o.token;
  c.rank = o.rank;
  c.connect_timeout = connect_timeout;
  // A round trip blocked on a stopped store must end well within the timeout, so the loss can be reported.
  c.operation_timeout =
      std::clamp(o.timeout / 4, std::chrono::milliseconds(100), std::chrono::milliseconds(10000));
  return c;
}

int next_peer(int after, const WatchdogOptions& o) {
  const int next = (after + 1) % o.world_size;
  return next == o.rank ? -1 : next;
}

}  // namespace

Watchdog::Watchdog(WatchdogOptions options)
    : options_(std::move(options)), session_(std::make_unique<Session>()) {
  if (options_.world_size < 1 || options_.rank < 0 || options_.rank >= options_.world_size) {
    throw std::invalid_argument(
        fmt::format("Watchdog: rank {} is not in a world of {} ranks", options_.rank, options_.world_size));
  }
  if (options_.heartbeat_interval.count() <= 0 || options_.timeout <= options_.heartbeat_interval) {
    throw std::invalid_argument(
        fmt::format("Watchdog: the timeout ({} ms) must exceed the heartbeat interval ({} ms)",
                    options_.timeout.count(), options_.heartbeat_interval.count()));
  }
  if (options_.host.empty() || options_.host.find_first_of(" \n") != std::string::npos) options_.host = "?";
  Session& s = *session_;
  s.client = std::make_unique<StoreClient>(
      client_options(options_, std::max(options_.timeout, std::chrono::milliseconds(10000))));
  s.store_endpoint = s.client->endpoint();
  s.peer = next_peer(options_.rank, options_);
  s.last_store_success = s.peer_last_advance = Clock::now();
  Heartbeat first{.counter = ++s.counter, .activity = {}, .host = options_.host};
  s.client->set(key_of(options_.rank), bytes_of(first.encode()));
  heartbeats_sent_.store(1);
  thread_ = std::thread([this] { run(); });
}

Watchdog::~Watchdog() { stop(); }

// Note [Collective bookkeeping]
// The main thread writes the collective's fields inside a sequence lock (version_ odd while writing) and the
// watchdog thread copies them and retries when the version moved, so it never mixes two collectives. All
// fields are atomics with relaxed ordering plus two fences: no lock, and a few nanoseconds per collective.
void Watchdog::enter_collective(const char* name, int64_t bytes) {
  const uint64_t v = version_.load(std::memory_order_relaxed);
  version_.store(v + 1, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_release);
  collective_sequence_.store(collective_sequence_.load(std::memory_order_relaxed) + 1,
                             std::memory_order_relaxed);
  collective_name_.store(name, std::memory_order_relaxed);
  collective_bytes_.store(bytes, std::memory_order_relaxed);
  collective_started_ns_.store(now_ns(), std::memory_order_relaxed);
  in_collective_.store(true, std::memory_order_relaxed);
  version_.store(v + 2, std::memory_order_release);
}

void Watchdog::leave_collective() {
  const uint64_t v = version_.load(std::memory_order_relaxed);
  version_.store(v + 1, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_release);
  in_collective_.store(false, std::memory_order_relaxed);
  version_.store(v + 2, std::memory_order_release);
}

namespace {
// Reads a consistent copy of the main thread's collective (Note [Collective bookkeeping]).
template <class Load>
Activity snapshot(const std::atomic<uint64_t>& version, Load&& load) {
  Activity a;
  for (int attempt = 0; attempt < 100; ++attempt) {
    const uint64_t before = version.load(std::memory_order_acquire);
    if (before % 2 == 1) continue;
    a = load();
    std::atomic_thread_fence(std::memory_order_acquire);
    if (version.load(std::memory_order_relaxed) == before) break;
  }
  return a;
}
}  // namespace

Activity Watchdog::activity() const {
  return snapshot(version_, [this] {
    Activity r;
    r.sequence = collective_sequence_.load(std::memory_order_relaxed);
    if (r.sequence == 0) return r;
    const char* name = collective_name_.load(std::memory_order_relaxed);
    r.collective = name != nullptr && *name != '\0' ? name : "collective";
    r.bytes = collective_bytes_.load(std::memory_order_relaxed);
    const bool in = in_collective_.load(std::memory_order_relaxed);
    r.state = in ? Activity::State::In : Activity::State::Done;
    if (in) r.in_for_ms = (now_ns() - collective_started_ns_.load(std::memory_order_relaxed)) / 1000000;
    return r;
  });
}

std::string Watchdog::describe_activity() const {
  const Activity a = activity();
  switch (a.state) {
    case Activity::State::In:
      return fmt::format("is in {} for {:.1f} s", describe_collective(a), a.in_for_ms / 1000.0);
    case Activity::State::Done:
      return fmt::format("last finished {}", describe_collective(a));
    default:
      return "is in no collective yet";
  }
}

std::string Watchdog::prefix() const {
  return fmt::format("vimo watchdog [rank {} on {}]: ", options_.rank, options_.host);
}

void Watchdog::run() {
  std::unique_lock lock(stop_mutex_);
  while (true) {
    stop_signal_.wait_for(lock, options_.heartbeat_interval, [this] { return stop_requested_.load(); });
    if (stop_requested_.load()) return;
    if (paused_.load()) continue;
    lock.unlock();
    std::optional<WatchdogFailure> failure = beat();
    if (failure) return fail(*failure);
    lock.lock();
  }
}

namespace {
// What a failure is about and what to do, before this rank's own situation is added.
struct FailureReport {
  WatchdogFailure::Kind kind;
  int missing_rank;
  int found_by;
  std::string body;
  std::string hint;

  // The store's copy: Note [Heartbeats]. Line-separated; the body and hint hold no newline.
  std::string encode() const {
    return fmt::format("{}\n{}\n{}\n{}\n{}", static_cast<int>(kind), missing_rank, found_by, body, hint);
  }
  static std::optional<FailureReport> decode(const std::string& text) {
    std::istringstream in(text);
    FailureReport r{};
    std::string kind, missing, found_by;
    if (!std::getline(in, kind) || !std::getline(in, missing) || !std::getline(in, found_by) ||
        !std::getline(in, r.body) || !std::getline(in, r.hint)) {
      return std::nullopt;
    }
    try {
      r.kind = static_cast<WatchdogFailure::Kind>(std::stoi(kind));
      r.missing_rank = std::stoi(missing);
      r.found_by = std::stoi(found_by);
    } catch (const std::exception&) {
      return std::nullopt;
    }
    return r;
  }
};
}  // namespace

std::optional<WatchdogFailure> Watchdog::beat() {
  Session& s = *session_;
  const Activity mine = activity();
  const auto finish = [&](const FailureReport& r) {
    // Publish what this rank found, once per job, so the others stop at their next heartbeat.
    if (r.kind != WatchdogFailure::Kind::ReportedByPeer && r.kind != WatchdogFailure::Kind::StoreLost &&
        s.client) {
      try {
        if (s.client->add(kFailureClaimsKey, 1) == 1) s.client->set(kFailureKey, bytes_of(r.encode()));
      } catch (const std::exception&) {
        // The others still find the failure themselves, a little later.
      }
    }
    WatchdogFailure f;
    f.kind = r.kind;
    f.missing_rank = r.missing_rank;
    const std::string found =
        r.kind == WatchdogFailure::Kind::ReportedByPeer ? fmt::format("; found by rank {}", r.found_by) : "";
    f.message = fmt::format("{}{}{}; this rank {}. Exiting so the job does not hang. HINT: {}", prefix(),
                            r.body, found, describe_activity(), r.hint);
    return std::optional<WatchdogFailure>(std::move(f));
  };

  if (mine.state == Activity::State::In &&
      std::chrono::milliseconds(mine.in_for_ms) > options_.collective_timeout) {
    return finish(
        {WatchdogFailure::Kind::StuckCollective, options_.rank, options_.rank,
         fmt::format("this rank has been in {} for {:.1f} s, over its collective timeout of {:.1f} s, "
                     "while the rank it watches sends heartbeats",
                     describe_collective(mine), mine.in_for_ms / 1000.0,
                     seconds(options_.collective_timeout)),
         fmt::format("another rank may be making a different collective (the ranks' calls must come in "
                     "the same order) or be far behind; {} sets the limit",
                     watchdog_env::kCollectiveTimeoutS)});
  }

  try {
    if (!s.client) {
      const auto connect_timeout = std::clamp(options_.heartbeat_interval, std::chrono::milliseconds(100),
                                              std::max(std::chrono::milliseconds(100), options_.timeout / 4));
      s.client = std::make_unique<StoreClient>(client_options(options_, connect_timeout));
    }
    const Heartbeat heartbeat{++s.counter, mine, options_.host};
    s.client->set(key_of(options_.rank), bytes_of(heartbeat.encode()));
    heartbeats_sent_.fetch_add(1, std::memory_order_relaxed);
    if (s.client->check({kFailureKey})) {
      std::optional<FailureReport> r = FailureReport::decode(text_of(s.client->get(kFailureKey)));
      if (r && r->found_by != options_.rank) {
        r->kind = WatchdogFailure::Kind::ReportedByPeer;
        return finish(*r);
      }
    }
    while (s.peer >= 0) {
      const std::string key = key_of(s.peer);
      if (!s.peer_heartbeat && !s.client->check({key})) break;  // it has not started yet
      const std::optional<Heartbeat> h = Heartbeat::decode(text_of(s.client->get(key)));
      if (h && h->activity.state == Activity::State::Finished) {
        s.peer = next_peer(s.peer, options_);  // it ended normally: watch the next one
        s.peer_heartbeat.reset();
        s.peer_last_advance = Clock::now();
        continue;
      }
      if (h && (!s.peer_heartbeat || h->counter != s.peer_heartbeat->counter)) {
        s.peer_last_advance = Clock::now();
        s.peer_heartbeat = h;
      }
      break;
    }
    s.last_store_success = Clock::now();
  } catch (const std::exception& e) {
    s.client.reset();  // unusable after an error; reconnect at the next heartbeat
    s.last_store_error = e.what();
    const auto hint = s.last_store_error.find(". HINT:");  // its hint is about connecting; ours follows
    if (hint != std::string::npos) s.last_store_error.resize(hint);
    const auto silent = Clock::now() - s.last_store_success;
    if (silent <= options_.timeout) return std::nullopt;
    return finish(
        {WatchdogFailure::Kind::StoreLost, 0, options_.rank,
         fmt::format("the rendezvous store at {}, which rank 0 serves, has not answered for {:.1f} s, so "
                     "rank 0 died or was stopped, or the network to it is down (last error: {})",
                     s.store_endpoint, seconds(silent), s.last_store_error),
         fmt::format("look for rank 0's own error (a crash, out of memory, a signal) in its log; {} sets how "
                     "long the store may be silent",
                     watchdog_env::kWatchdogTimeoutS)});
  }

  const auto silent = Clock::now() - s.peer_last_advance;
  if (s.peer < 0 || silent <= options_.timeout) return std::nullopt;
  const std::string about =
      s.peer_heartbeat
          ? fmt::format("rank {} (host {}) sent no heartbeat for {:.1f} s; {}", s.peer,
                        s.peer_heartbeat->host, seconds(silent),
                        describe_peer_activity(s.peer_heartbeat->activity))
          : fmt::format(
                "rank {} sent no heartbeat in the {:.1f} s since this rank started (its host and last "
                "collective are unknown: it never started its watchdog)",
                s.peer, seconds(silent));
  const std::string where = s.peer_heartbeat ? fmt::format(" on {}", s.peer_heartbeat->host) : "";
  return finish({WatchdogFailure::Kind::MissingPeer, s.peer, options_.rank, about,
                 fmt::format("rank {} died or was stopped: look for its own error (a crash, out of memory, a "
                             "signal) in its log{}; {} sets how long a silent rank is tolerated",
                             s.peer, where, watchdog_env::kWatchdogTimeoutS)});
}

void Watchdog::fail(const WatchdogFailure& failure) {
  session_->failed = true;
  if (options_.on_failure) return options_.on_failure(failure);
  std::fprintf(stderr, "%s\n", failure.message.c_str());
  std::fflush(stderr);
  // Give the others two heartbeats to read the published failure (rank 0's store must outlive that).
  std::this_thread::sleep_for(2 * options_.heartbeat_interval);
  std::_Exit(options_.exit_code);
}

void Watchdog::stop() {
  {
    std::lock_guard lock(stop_mutex_);
    if (stopped_) return;
    stopped_ = true;
    stop_requested_.store(true);
  }
  stop_signal_.notify_all();
  if (thread_.joinable()) thread_.join();
  Session& s = *session_;
  if (s.failed) return;
  try {
    if (!s.client)
      s.client = std::make_unique<StoreClient>(client_options(options_, options_.heartbeat_interval));
    Heartbeat last{++s.counter, activity(), options_.host};
    last.activity.state = Activity::State::Finished;
    s.client->set(key_of(options_.rank), bytes_of(last.encode()));
  } catch (const std::exception&) {
    // The store is gone: the job is ending anyway.
  }
  s.client.reset();
}

}  // namespace vimo::comm
