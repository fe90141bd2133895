// PreemptionSignals: a SIGTERM or SIGUSR1 is recorded (the first one), later ones are ignored, and the
// handlers that were there before come back. The training loop's use of it (every rank saves and exits
// with kExitPreempted, and the run resumes exactly) is tested by tests/e2e/preempt_resume.sh under mpirun.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>

#include "trainer/preemption.h"

namespace vimo::trainer {
namespace {

std::atomic<int> g_previous_handler_calls{0};
extern "C" void count_calls(int) { ++g_previous_handler_calls; }

TEST(PreemptionSignals, RecordsTheFirstSignal) {
  const PreemptionSignals signals;
  EXPECT_EQ(signals.received(), 0);
  ASSERT_EQ(std::raise(SIGUSR1), 0);  // the process lives on: the handler only records it
  EXPECT_EQ(signals.received(), SIGUSR1);
  EXPECT_EQ(PreemptionSignals::name(signals.received()), "SIGUSR1");
}

TEST(PreemptionSignals, EachInstanceStartsWithNoSignal) {
  {
    const PreemptionSignals first;
    ASSERT_EQ(std::raise(SIGTERM), 0);
    EXPECT_EQ(first.received(), SIGTERM);
  }
  const PreemptionSignals second;
  EXPECT_EQ(second.received(), 0);
}

TEST(PreemptionSignals, RestoresThePreviousHandlers) {
  g_previous_handler_calls = 0;
  ASSERT_NE(std::signal(SIGUSR1, count_calls), SIG_ERR);
  ASSERT_NE(std::signal(SIGTERM, count_calls), SIG_ERR);
  {
    const PreemptionSignals signals;
    ASSERT_EQ(std::raise(SIGUSR1), 0);
    EXPECT_EQ(g_previous_handler_calls, 0);
  }
  ASSERT_EQ(std::raise(SIGUSR1), 0);
  ASSERT_EQ(std::raise(SIGTERM), 0);
  EXPECT_EQ(g_previous_handler_calls, 2);
  std::signal(SIGUSR1, SIG_DFL);
  std::signal(SIGTERM, SIG_DFL);
}

TEST(PreemptionSignals, OneInstanceAtATime) {
  const PreemptionSignals signals;
  EXPECT_THROW(PreemptionSignals{}, std::logic_error);
}

// Later signals are ignored (a rank often gets one from the scheduler and the same again from the launcher):
// the first is kept and the process lives on to save. Run in a child, where a default action would end it.
TEST(PreemptionSignals, LaterSignalsAreIgnored) {
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    const PreemptionSignals signals;
    for (const int signal : {SIGUSR1, SIGTERM, SIGUSR1, SIGTERM}) std::raise(signal);
    ::_exit(signals.received() == SIGUSR1 ? 0 : 10);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status)) << "a later signal ended the process: signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 0) << "the first signal was not the one kept";
}

}  // namespace
}  // namespace vimo::trainer
