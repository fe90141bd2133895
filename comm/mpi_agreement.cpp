// Defines the agreement every blocking MPI collective makes before its payload moves (declared in
// comm/mpi_internal.h): the ranks exchange a signature of the call and fail together when they differ. See
// Note [Agreeing on a collective before running it].
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <mpi.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/mpi_internal.h"

namespace vimo::comm::mpi_detail {
namespace {

// Note [Agreeing on a collective before running it]
// MPI matches collectives by order alone. A rank that passes another shape, dtype, op or root makes the
// others read garbage or hang, and a rank that rejects its input and throws leaves the others waiting
// forever. So every blocking collective first exchanges a small fixed-size signature of the call (which
// collective, dtype, op or root, shape, and whether this rank's own checks passed). Up to
// kGatherAgreementRanks ranks (VIMO_COMM_AGREEMENT_GATHER_RANKS), every rank all-gathers every signature (one
// round of messages: the cheapest exchange there is, which matters because it is a fixed cost paid by every
// blocking call; an all-reduce takes 2(p-1) rounds in Open MPI's non-blocking ring) and compares them itself.
// Beyond that, where p messages per rank would add up, the ranks all-reduce [s, -s] with MPI_MAX, which hands
// every rank both the maximum and the minimum of each field: they agree exactly when the two are equal, and
// only on disagreement do they gather the signatures. Either way every rank sees the same data, so on
// disagreement all of them take the error path together and throw errors that name every rank's call, and
// nobody is left waiting. Split agrees on the call only: its color and key differ between ranks by design.
// Asynchronous calls skip the agreement by default: see Note [Agreement on asynchronous calls].
//
// Note [Agreement on asynchronous calls]
// For an asynchronous call the agreement would be a blocking all-reduce at launch: the rank that reaches a
// gradient bucket first would wait there for the slowest rank to reach the same bucket, serialising backward
// with communication, which is what asynchronous calls exist to avoid. So they check only their own inputs
// (throwing on this rank alone) and rely on the caller to issue the same calls everywhere: GradientReducer
// builds identical buckets on every rank and checks that layout once, at construction, with blocking calls.
// A mismatch that slips through shows up as MPI's own error (a truncated message) or, when a rank skipped a
// call, as the timeout of Note [Collective timeouts] naming the call. VIMO_COMM_CHECK_ASYNC=1 makes
// asynchronous calls run the agreement first, like blocking ones: a debugging aid for a suspected mismatch.
constexpr int kGatherAgreementRanks = 64;  // up to here the agreement is an all-gather of signatures
constexpr const char* kGatherAgreementVariable = "VIMO_COMM_AGREEMENT_GATHER_RANKS";

// kGatherAgreementRanks, or VIMO_COMM_AGREEMENT_GATHER_RANKS when set (a non-negative integer; the tests set
// 0 to run the all-reduce path on few ranks). Read once.
int gather_agreement_ranks() {
  static const int ranks = [] {
    const char* value = std::getenv(kGatherAgreementVariable);
    if (value == nullptr || *value == '\0') return kGatherAgreementRanks;
    char* end = nullptr;
    const long parsed = std::strtol(value, &end, 10);
    if (*end != '\0' || parsed < 0 || parsed > INT_MAX) {
      throw std::runtime_error(
          fmt::format("{}='{}' is not a non-negative integer", kGatherAgreementVariable, value));
    }
    return static_cast<int>(parsed);
  }();
  return ranks;
}

}  // namespace

// See Note [Agreeing on a collective before running it]. Its collectives are non-blocking underneath, so a
// rank that never arrives makes it time out instead of hang. They exchange through group->agreement, and
// their MpiWorks live on this stack: Note [The fixed cost of a blocking call].
void agree(const std::shared_ptr<MpiGroup>& group, std::chrono::milliseconds timeout, const CallName& call,
           int64_t bytes, const std::string& problem) {
  const int rank = group->rank;
  const int size = group->size;
  MpiGroup::AgreementBuffers& buffers = group->agreement;
  Signature& mine = buffers.mine;
  mine = call.signature();
  mine[kInputAccepted] = problem.empty() ? 1 : 0;
  if (size > gather_agreement_ranks()) {
    int64_t* e = buffers.extremes.data();  // [max of each field, -(min of each field)]
    for (int i = 0; i < kSignatureLength; ++i) {
      e[i] = mine[i];
      e[kSignatureLength + i] = -mine[i];
    }
    MpiWork work(group, call, bytes, timeout);
    VIMO_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, e, static_cast<int>(buffers.extremes.size()), MPI_INT64_T,
                                  MPI_MAX, group->comm, work.request()));
    work.wait();
    bool same = true;
    for (int i = 0; i < kSignatureLength; ++i) same = same && e[i] == -e[kSignatureLength + i];
    if (same && mine[kInputAccepted] == 1) return;
  }

  std::vector<int64_t>& all = buffers.all;  // [ranks, signature]
  all.resize(static_cast<size_t>(size) * kSignatureLength);
  MpiWork gather(group, call, bytes, timeout);
  VIMO_MPI_CHECK(MPI_Iallgather(mine.data(), kSignatureLength, MPI_INT64_T, all.data(), kSignatureLength,
                                MPI_INT64_T, group->comm, gather.request()));
  gather.wait();
  judge_signatures(rank, call, mine, all, problem);
}

}  // namespace vimo::comm::mpi_detail
