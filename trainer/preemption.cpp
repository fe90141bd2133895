// Implements PreemptionSignals (see preemption.h, Note [Preemption at a step boundary]).
#include "trainer/preemption.h"

#include <atomic>
#include <stdexcept>

namespace vimo::trainer {
namespace {

// Written by the handler on whichever thread the signal lands: a lock-free atomic is safe there.
std::atomic<int> g_received{0};
std::atomic<bool> g_installed{false};
static_assert(std::atomic<int>::is_always_lock_free);

extern "C" void on_preemption_signal(int signal) {
  int expected = 0;
  g_received.compare_exchange_strong(expected, signal);  // the first one is kept; later ones are ignored
}

void install(int signal, struct sigaction* previous) {
  struct sigaction action {};
  action.sa_handler = on_preemption_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;  // a read or write the signal lands in goes on instead of failing with EINTR
  if (::sigaction(signal, &action, previous) != 0) {
    throw std::runtime_error("cannot install the handler of " + PreemptionSignals::name(signal));
  }
}

}  // namespace

PreemptionSignals::PreemptionSignals() {
  if (g_installed.exchange(true)) throw std::logic_error("PreemptionSignals is already installed");
  g_received.store(0);
  install(SIGTERM, &previous_term_);
  install(SIGUSR1, &previous_usr1_);
}

PreemptionSignals::~PreemptionSignals() {
  ::sigaction(SIGTERM, &previous_term_, nullptr);
  ::sigaction(SIGUSR1, &previous_usr1_, nullptr);
  g_installed.store(false);
}

int PreemptionSignals::received() const { return g_received.load(); }

std::string PreemptionSignals::name(int signal) {
  if (signal == SIGTERM) return "SIGTERM";
  if (signal == SIGUSR1) return "SIGUSR1";
  return "signal " + std::to_string(signal);
}

}  // namespace vimo::trainer
