// Defines PreemptionSignals: SIGTERM and SIGUSR1 (how Slurm announces preemption or the end of a job's
// time) become a request that the training loop honours at its next step boundary: every rank saves a
// checkpoint and the job exits with kExitPreempted, so that a requeued job continues with --resume
// (DESIGN.md, "Checkpoints").
//
// Note [Preemption at a step boundary]: a signal handler may do almost nothing (no allocation, no I/O, no
// collective), so it only records the signal. The loop reads the record once per step and sums it over the
// ranks in the all-reduce it already makes for the step's loss, so every rank learns in the same step that
// some rank was signalled, even when the launcher signalled one rank only, and they all save that step and
// stop together: no extra collective per step, and no rank left waiting in one the others have quit. Later
// signals are ignored: a rank often gets the same one twice (from the scheduler and again from the launcher
// passing it on), and the save must not be cut short by the second. A run that must die at once gets SIGKILL
// (Slurm sends it when the grace time is over); SIGINT (Ctrl-C) is left alone and ends the run.
#pragma once

#include <csignal>
#include <string>

namespace vimo::trainer {

// The exit status of a run that stopped for a signal after saving a checkpoint: EX_TEMPFAIL of
// <sysexits.h>, "try again later". launch/slurm/retriever.sbatch requeues the job when it sees it.
inline constexpr int kExitPreempted = 75;

class PreemptionSignals {
 public:
  // Installs the handlers for SIGTERM and SIGUSR1 (one instance at a time per process).
  PreemptionSignals();
  ~PreemptionSignals();  // restores the handlers that were there before
  PreemptionSignals(const PreemptionSignals&) = delete;
  PreemptionSignals& operator=(const PreemptionSignals&) = delete;

  // The signal received since construction (the first one), or 0.
  int received() const;
  // "SIGTERM", "SIGUSR1", or "signal N".
  static std::string name(int signal);

 private:
  struct sigaction previous_term_ {
  }, previous_usr1_{};
};

}  // namespace vimo::trainer
