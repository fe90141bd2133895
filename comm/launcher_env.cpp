// Reads the launcher's environment (OpenMPI, torchrun, Slurm) into a LaunchEnvironment, and parses Slurm's
// compressed host lists.
#include "comm/launcher_env.h"

#include <fmt/format.h>

#include <charconv>
#include <cstdlib>
#include <stdexcept>
#include <tuple>
#include <utility>

namespace vimo::comm {

namespace env = launcher_env;

// Note [Launcher precedence]
// Launchers nest, and a process inherits the variables of every launcher above it, so several sets can be
// present at once. We pick the one that describes this process:
//   1. OpenMPI (any OMPI_COMM_WORLD_* set). MPI_Init forms exactly the world mpirun describes, so when those
//      variables exist, any other rank numbering would disagree with MPI's. `mpirun` inside a Slurm
//      allocation is the common case: the SLURM_* variables then describe the allocation, not our process.
//   2. torchrun (RANK or WORLD_SIZE set). `srun torchrun ...` starts one torchrun per node, whose
//      SLURM_PROCID is the node's index; torchrun's RANK is the worker's. LOCAL_RANK alone does not count:
//      other tools set it without the rest.
//   3. Slurm (SLURM_PROCID set): one task per rank, started by srun.
//   4. none: a single process.
// Running torchrun under mpirun is therefore not supported: its workers would take the agent's MPI rank.
// Under torchrun the store listens on MASTER_PORT unless VIMO_RENDEZVOUS_PORT says otherwise; set that when
// torchrun's own agent already serves its store on MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE).

namespace {

struct Reader {
  const EnvironmentLookup& lookup;

  const char* raw(const char* name) const { return lookup(name); }
  bool has(const char* name) const { return raw(name) != nullptr; }

  // The value as an int, or nullopt when unset. Strict: the whole value must be a decimal integer (no spaces,
  // no '+', no trailing text) that fits an int, because a half-parsed rank is worse than an error.
  std::optional<int> optional_int(const char* name) const {
    const char* value = raw(name);
    if (value == nullptr) return std::nullopt;
    const std::string_view text(value);
    int result = 0;
    const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), result);
    if (error == std::errc::result_out_of_range) {
      throw std::runtime_error(fmt::format("{}='{}' is out of the range of an int", name, text));
    }
    if (error != std::errc() || end != text.data() + text.size() || text.empty()) {
      throw std::runtime_error(fmt::format("{}='{}' is not an integer", name, text));
    }
    return result;
  }

  int required_int(const char* name, const char* launcher, const std::string& hint) const {
    const std::optional<int> value = optional_int(name);
    if (!value) {
      throw std::runtime_error(
          fmt::format("{} is not set although other {} variables are. HINT: {}", name, launcher, hint));
    }
    return *value;
  }

  std::string required_text(const char* name, const char* launcher, const std::string& hint) const {
    const char* value = raw(name);
    if (value == nullptr) {
      throw std::runtime_error(
          fmt::format("{} is not set although other {} variables are. HINT: {}", name, launcher, hint));
    }
    return value;
  }

  // A TCP port in [1, 65535], or nullopt when unset.
  std::optional<uint16_t> optional_port(const char* name) const {
    const std::optional<int> port = optional_int(name);
    if (!port) return std::nullopt;
    if (*port < 1 || *port > 65535) {
      throw std::runtime_error(
          fmt::format("{}={} is out of range: expected a TCP port in [1, 65535]", name, *port));
    }
    return static_cast<uint16_t>(*port);
  }
};

void require(bool ok, const std::string& what, const std::string& hint) {
  if (!ok) throw std::runtime_error(fmt::format("{}. HINT: {}", what, hint));
}

// Checks the four numbers every launcher gives; `local_size` may be unknown.
void check_ranks(const char* rank_name, int rank, const char* size_name, int size,
                 const char* local_rank_name, int local_rank, const char* local_size_name,
                 std::optional<int> local_size, const std::string& hint) {
  require(size >= 1, fmt::format("{}={} is out of range: expected at least 1", size_name, size), hint);
  require(rank >= 0 && rank < size,
          fmt::format("{}={} is out of range: expected 0 <= rank < {}={}", rank_name, rank, size_name, size),
          hint);
  if (local_size) {
    require(*local_size >= 1 && *local_size <= size,
            fmt::format("{}={} is out of range: expected 1 <= local size <= {}={}", local_size_name,
                        *local_size, size_name, size),
            hint);
    require(local_rank >= 0 && local_rank < *local_size,
            fmt::format("{}={} is out of range: expected 0 <= local rank < {}={}", local_rank_name,
                        local_rank, local_size_name, *local_size),
            hint);
  } else {
    require(local_rank >= 0 && local_rank < size,
            fmt::format("{}={} is out of range: expected 0 <= local rank < {}={}", local_rank_name,
                        local_rank, size_name, size),
            hint);
  }
}

LaunchEnvironment from_openmpi(const Reader& reader) {
  const std::string hint = fmt::format(
      "these variables come from mpirun; do not set them by hand, or unset all of {}, {}, {} and {}",
      env::kOpenMpiRank, env::kOpenMpiSize, env::kOpenMpiLocalRank, env::kOpenMpiLocalSize);
  LaunchEnvironment launch;
  launch.launcher = "openmpi";
  launch.rank = reader.required_int(env::kOpenMpiRank, "OMPI_COMM_WORLD_*", hint);
  launch.world_size = reader.required_int(env::kOpenMpiSize, "OMPI_COMM_WORLD_*", hint);
  launch.local_rank = reader.required_int(env::kOpenMpiLocalRank, "OMPI_COMM_WORLD_*", hint);
  launch.local_size = reader.required_int(env::kOpenMpiLocalSize, "OMPI_COMM_WORLD_*", hint);
  check_ranks(env::kOpenMpiRank, launch.rank, env::kOpenMpiSize, launch.world_size, env::kOpenMpiLocalRank,
              launch.local_rank, env::kOpenMpiLocalSize, launch.local_size, hint);
  return launch;  // MPI forms the world itself: no rendezvous store
}

LaunchEnvironment from_torchrun(const Reader& reader) {
  const std::string hint = fmt::format(
      "launch with torchrun, or set all of {}, {}, {}, {} and {} (PyTorch's env:// convention)",
      env::kTorchRank, env::kTorchWorldSize, env::kTorchLocalRank, env::kMasterAddr, env::kMasterPort);
  LaunchEnvironment launch;
  launch.launcher = "torchrun";
  launch.rank = reader.required_int(env::kTorchRank, "torchrun", hint);
  launch.world_size = reader.required_int(env::kTorchWorldSize, "torchrun", hint);
  launch.local_rank = reader.required_int(env::kTorchLocalRank, "torchrun", hint);
  launch.local_size = reader.optional_int(env::kTorchLocalWorldSize);
  check_ranks(env::kTorchRank, launch.rank, env::kTorchWorldSize, launch.world_size, env::kTorchLocalRank,
              launch.local_rank, env::kTorchLocalWorldSize, launch.local_size, hint);
  RendezvousEndpoint endpoint;
  endpoint.host = reader.required_text(env::kMasterAddr, "torchrun", hint);
  require(!endpoint.host.empty() && endpoint.host.find_first_of(" \t\n") == std::string::npos,
          fmt::format("{}='{}' is not a host name or address", env::kMasterAddr, endpoint.host), hint);
  if (const std::optional<uint16_t> port = reader.optional_port(env::kRendezvousPort)) {
    endpoint.port = *port;
  } else {
    reader.required_text(env::kMasterPort, "torchrun", hint);  // names the variable when it is unset
    endpoint.port = *reader.optional_port(env::kMasterPort);
  }
  launch.rendezvous = endpoint;
  return launch;
}

// The local size from SLURM_TASKS_PER_NODE, e.g. "4(x2),3": 4 tasks on each of 2 nodes, then 3. Known when
// every node runs the same number of tasks, or when SLURM_NODEID says which entry is ours.
std::optional<int> slurm_tasks_per_node(const Reader& reader, const char* variable) {
  const char* raw = reader.raw(variable);
  if (raw == nullptr) return std::nullopt;
  const std::string_view text(raw);
  auto malformed = [&](const std::string& why) {
    return std::runtime_error(
        fmt::format("{}='{}' is malformed: {}; expected counts like '4(x2),3'", variable, text, why));
  };
  auto number = [&](std::string_view digits) {
    int value = 0;
    const auto [end, error] = std::from_chars(digits.data(), digits.data() + digits.size(), value);
    if (error != std::errc() || end != digits.data() + digits.size() || digits.empty() || value < 1) {
      throw malformed(fmt::format("'{}' is not a positive integer", digits));
    }
    return value;
  };
  std::vector<int> per_node;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t comma = std::min(text.find(',', start), text.size());
    const std::string_view item = text.substr(start, comma - start);
    const size_t paren = item.find('(');
    int repeat = 1;
    if (paren != std::string_view::npos) {
      if (item.size() < paren + 4 || item.substr(paren, 2) != "(x" || item.back() != ')') {
        throw malformed(fmt::format("'{}' is not 'count(xrepeat)'", item));
      }
      repeat = number(item.substr(paren + 2, item.size() - paren - 3));
    }
    const int count = number(item.substr(0, paren));
    if (per_node.size() + static_cast<size_t>(repeat) > (size_t{1} << 20))
      throw malformed("more than 2^20 nodes");
    per_node.insert(per_node.end(), repeat, count);
    start = comma + 1;
  }
  const std::optional<int> node = reader.optional_int(env::kSlurmNodeId);
  if (node) {
    require(*node >= 0 && static_cast<size_t>(*node) < per_node.size(),
            fmt::format("{}={} is out of range: expected 0 <= node < {} (the nodes in {}='{}')",
                        env::kSlurmNodeId, *node, per_node.size(), variable, text),
            "these variables come from srun; do not set them by hand");
    return per_node[*node];
  }
  for (int count : per_node) {
    if (count != per_node.front()) return std::nullopt;
  }
  return per_node.front();
}

LaunchEnvironment from_slurm(const Reader& reader) {
  const std::string hint = "these variables come from srun; do not set them by hand, or unset SLURM_PROCID";
  LaunchEnvironment launch;
  launch.launcher = "slurm";
  launch.rank = reader.required_int(env::kSlurmProcId, "Slurm", hint);
  launch.world_size = reader.required_int(env::kSlurmNtasks, "Slurm", hint);
  launch.local_rank = reader.required_int(env::kSlurmLocalId, "Slurm", hint);
  // The step's own tasks per node first: srun rewrites SLURM_TASKS_PER_NODE and sets
  // SLURM_STEP_TASKS_PER_NODE for its step, but leaves the allocation's SLURM_NTASKS_PER_NODE, which a step
  // of fewer tasks (srun -n 1 in an --ntasks-per-node=2 job) does not run.
  const char* local_size_name = reader.has(env::kSlurmStepTasksPerNode) ? env::kSlurmStepTasksPerNode
                                : reader.has(env::kSlurmTasksPerNode)   ? env::kSlurmTasksPerNode
                                                                        : env::kSlurmNtasksPerNode;
  launch.local_size = local_size_name == env::kSlurmNtasksPerNode
                          ? reader.optional_int(local_size_name)
                          : slurm_tasks_per_node(reader, local_size_name);
  check_ranks(env::kSlurmProcId, launch.rank, env::kSlurmNtasks, launch.world_size, env::kSlurmLocalId,
              launch.local_rank, local_size_name, launch.local_size, hint);

  // Task 0 runs on the first node of its step (srun's block distribution), so rank 0's store listens there.
  // A step may use fewer nodes than the job: its own list comes first. MASTER_ADDR overrides both, for
  // scripts that already compute the head node.
  RendezvousEndpoint endpoint;
  if (const char* master = reader.raw(env::kMasterAddr)) {
    endpoint.host = master;
    require(!endpoint.host.empty() && endpoint.host.find_first_of(" \t\n") == std::string::npos,
            fmt::format("{}='{}' is not a host name or address", env::kMasterAddr, endpoint.host),
            "unset it to use the first node of the Slurm step");
  } else {
    const char* name = reader.has(env::kSlurmStepNodeList) ? env::kSlurmStepNodeList : env::kSlurmJobNodeList;
    const char* list = reader.raw(name);
    if (list == nullptr) {
      throw std::runtime_error(fmt::format(
          "neither {} nor {} is set, so the rendezvous host is unknown. HINT: launch with srun, or set {}",
          env::kSlurmStepNodeList, env::kSlurmJobNodeList, env::kMasterAddr));
    }
    try {
      endpoint.host = first_slurm_host(list);
    } catch (const std::invalid_argument& e) {
      throw std::runtime_error(fmt::format("{}='{}' is not a valid Slurm host list: {}. HINT: {}", name, list,
                                           e.what(), "set MASTER_ADDR to the head node instead"));
    }
  }
  if (auto port = reader.optional_port(env::kRendezvousPort)) {
    endpoint.port = *port;
  } else if (auto master_port = reader.optional_port(env::kMasterPort)) {
    endpoint.port = *master_port;
  } else if (const char* job = reader.raw(env::kSlurmJobId)) {
    const std::optional<int> id = reader.optional_int(env::kSlurmJobId);
    require(*id >= 0, fmt::format("{}='{}' is out of range: expected a job id >= 0", env::kSlurmJobId, job),
            hint);
    endpoint.port = static_cast<uint16_t>(kDefaultRendezvousPortBase + *id % kDefaultRendezvousPortSpan);
  } else {
    endpoint.port = kDefaultRendezvousPortBase;
  }
  launch.rendezvous = endpoint;
  return launch;
}

}  // namespace

LaunchEnvironment launch_environment(const EnvironmentLookup& lookup) {
  const Reader reader{lookup};
  LaunchEnvironment launch;
  if (reader.has(env::kOpenMpiRank) || reader.has(env::kOpenMpiSize) || reader.has(env::kOpenMpiLocalRank) ||
      reader.has(env::kOpenMpiLocalSize)) {
    launch = from_openmpi(reader);
  } else if (reader.has(env::kTorchRank) || reader.has(env::kTorchWorldSize)) {
    launch = from_torchrun(reader);
  } else if (reader.has(env::kSlurmProcId) &&
             (reader.has(env::kSlurmStepNodeList) || reader.has(env::kSlurmStepNumTasks))) {
    // Only a task of a job step is a Slurm rank: the batch shell has SLURM_PROCID=0 and the allocation's
    // SLURM_NTASKS too, but a program it runs outside srun is one process, not rank 0 of them.
    launch = from_slurm(reader);
  }
  if (const char* token = reader.raw(env::kRendezvousToken)) launch.rendezvous_token = token;
  return launch;
}

LaunchEnvironment launch_environment() {
  return launch_environment([](const char* name) { return std::getenv(name); });
}

// Note [srun without PMI]
// Open MPI 4 decides in MPI_Init how its process was started. A process of a job step (SLURM_STEP_ID set,
// with the allocation's SLURM_JOBID and SLURM_NODELIST) is to it a rank of an MPI job that srun launched
// directly, whose world it must learn from the PMI server srun runs with --mpi=pmix or --mpi=pmi2. Without
// one (--mpi=none, most clusters' default) MPI_Init aborts the process ("The application appears to have
// been direct launched using "srun", but OMPI was not built with SLURM's PMI support"), where vimo wants MPI
// to see the process alone and forms the world through its own store (comm/world.cpp). So MpiRuntime unsets
// SLURM_STEP_ID in such a process before MPI_Init: Open MPI then takes it for a program that the batch
// script runs in the allocation outside a step, which it runs as a singleton; vimo reads nothing from the
// variable. With a server (PMIX_RANK or PMI_RANK set, as under mpirun too) nothing changes: MPI forms the
// world, and vimo uses it.
bool srun_started_without_pmi(const EnvironmentLookup& lookup) {
  return lookup(env::kSlurmStepId) != nullptr && lookup(env::kPmixRank) == nullptr &&
         lookup(env::kPmiRank) == nullptr;
}

// Note [Slurm host lists]
// Slurm compresses node lists: "gpu[01-04,07],login1" names gpu01..gpu04, gpu07 and login1. The grammar we
// accept (Slurm's hostlist.c accepts the same for the lists it writes):
//   list  = name ("," name)*            a comma outside brackets separates names
//   name  = (text | "[" ranges "]")+    text is letters, digits, '-', '.', '_'
//   range = digits | digits "-" digits  separated by ','; the lower bound's digit count is the width
// Several bracket groups in one name ("rack[1-2]-node[01-02]") expand as a product, the last fastest, as
// Slurm's multi-dimensional lists do. Anything else is an error naming the position: a rank that guesses the
// wrong head node would wait for the whole timeout instead of failing now.
namespace {

struct NumberRange {
  uint64_t first = 0;
  uint64_t last = 0;
  size_t width = 0;  // digits of the lower bound as written: "08" pads to 2
};
// A host name is a sequence of parts: literal text, or (when `ranges` is not empty) a bracket group.
struct NamePart {
  std::string text;
  std::vector<NumberRange> ranges;
};
using HostPattern = std::vector<NamePart>;

[[noreturn]] void fail_at(size_t position, const std::string& what) {
  throw std::invalid_argument(fmt::format("{} at position {}", what, position));
}

bool is_host_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
         c == '_';
}

// Digits starting at `i` (advanced past them) inside the group opened at `open`; fails when there are none or
// too many for a node number.
std::pair<uint64_t, size_t> parse_digits(std::string_view list, size_t& i, size_t open) {
  const size_t start = i;
  while (i < list.size() && list[i] >= '0' && list[i] <= '9') ++i;
  if (i == start) {
    if (i == list.size()) fail_at(open, "unclosed '['");
    fail_at(i, fmt::format("expected a number, found '{}'", list[i]));
  }
  if (i - start > 18) fail_at(start, "a number of more than 18 digits");
  uint64_t value = 0;
  std::from_chars(list.data() + start, list.data() + i, value);
  return {value, i - start};
}

// The bracket group that starts at list[i] == '['; leaves `i` after its ']'.
std::vector<NumberRange> parse_bracket_group(std::string_view list, size_t& i) {
  const size_t open = i++;
  std::vector<NumberRange> ranges;
  while (true) {
    const size_t start = i;
    NumberRange range;
    std::tie(range.first, range.width) = parse_digits(list, i, open);
    range.last = range.first;
    if (i < list.size() && list[i] == '-') {
      ++i;
      range.last = parse_digits(list, i, open).first;
      if (range.last < range.first) {
        fail_at(start, fmt::format("the range '{}' decreases", list.substr(start, i - start)));
      }
    }
    ranges.push_back(range);
    if (i == list.size()) fail_at(open, "unclosed '['");
    if (list[i] == ']') {
      ++i;
      return ranges;
    }
    if (list[i] != ',') fail_at(i, fmt::format("unexpected character '{}' in a range", list[i]));
    ++i;
  }
}

std::vector<HostPattern> parse_host_list(std::string_view list) {
  if (list.empty()) throw std::invalid_argument("the list is empty");
  std::vector<HostPattern> patterns;
  HostPattern current;
  auto end_name = [&](size_t at) {
    if (current.empty()) fail_at(at, "an empty host name");
    patterns.push_back(std::move(current));
    current.clear();
  };
  size_t i = 0;
  while (i < list.size()) {
    const char c = list[i];
    if (c == ',') {
      end_name(i++);
    } else if (c == '[') {
      current.push_back(NamePart{"", parse_bracket_group(list, i)});
    } else if (c == ']') {
      fail_at(i, "']' without a matching '['");
    } else if (!is_host_char(c)) {
      fail_at(i, fmt::format("unexpected character '{}'", c));
    } else {
      if (current.empty() || !current.back().ranges.empty()) current.emplace_back();
      current.back().text += c;
      ++i;
    }
  }
  end_name(i);
  return patterns;
}

// Appends the hosts of `pattern` to `hosts` until it holds `max_hosts`; the last bracket group varies
// fastest.
void expand_pattern(const HostPattern& pattern, size_t max_hosts, std::vector<std::string>& hosts) {
  // position[g] = (index of the range, offset inside it) for each part; literal parts stay at (0, 0).
  std::vector<std::pair<size_t, uint64_t>> position(pattern.size(), {0, 0});
  while (hosts.size() < max_hosts) {
    std::string host;
    for (size_t p = 0; p < pattern.size(); ++p) {
      const NamePart& part = pattern[p];
      if (part.ranges.empty()) {
        host += part.text;
        continue;
      }
      const NumberRange& range = part.ranges[position[p].first];
      host += fmt::format("{:0{}}", range.first + position[p].second, range.width);
    }
    hosts.push_back(std::move(host));
    // Advance the odometer from the last group; done when the first group rolls over.
    size_t p = pattern.size();
    while (p-- > 0) {
      const NamePart& part = pattern[p];
      if (part.ranges.empty()) continue;
      auto& [range_index, offset] = position[p];
      if (part.ranges[range_index].first + offset < part.ranges[range_index].last) {
        ++offset;
        break;
      }
      offset = 0;
      if (++range_index < part.ranges.size()) break;
      range_index = 0;
    }
    if (p == static_cast<size_t>(-1)) return;
  }
}

}  // namespace

std::vector<std::string> expand_slurm_host_list(std::string_view list, std::size_t max_hosts) {
  const std::vector<HostPattern> patterns = parse_host_list(list);
  std::vector<std::string> hosts;
  for (const HostPattern& pattern : patterns) {
    expand_pattern(pattern, max_hosts + 1, hosts);
    if (hosts.size() > max_hosts) {
      throw std::invalid_argument(fmt::format("the list names more than {} hosts", max_hosts));
    }
  }
  return hosts;
}

std::string first_slurm_host(std::string_view list) {
  const std::vector<HostPattern> patterns = parse_host_list(list);  // checks the whole list
  std::vector<std::string> first;
  expand_pattern(patterns.front(), 1, first);
  return first.front();
}

}  // namespace vimo::comm
