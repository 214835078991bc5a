#include "bench/crosscheck.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>
#include <tuple>

extern char** environ;

namespace ibdisk::bench {
namespace {

using Clock = std::chrono::steady_clock;
constexpr double kPerftestMiB = 1.048576;  // perftest's "MB" is 2^20 bytes

std::string joined(const std::vector<std::string>& argv) {
  std::string s;
  for (const auto& a : argv) s += (s.empty() ? "" : " ") + a;
  return s;
}

bool installed(const std::string& tool) {
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path ? path : "/usr/bin:/bin");
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    if (!dir.empty() && ::access((dir + "/" + tool).c_str(), X_OK) == 0) return true;
  }
  return false;
}

// A child process whose stdout and stderr go to one pipe we read.
class Program {
 public:
  explicit Program(const std::vector<std::string>& argv) {
    int p[2];
    if (::pipe2(p, O_CLOEXEC) != 0) return;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, p[1], 1);
    posix_spawn_file_actions_adddup2(&fa, p[1], 2);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    if (::posix_spawnp(&pid_, args[0], &fa, nullptr, args.data(), environ) != 0) pid_ = -1;
    posix_spawn_file_actions_destroy(&fa);
    ::close(p[1]);
    fd_ = p[0];
  }
  Program(const Program&) = delete;
  Program& operator=(const Program&) = delete;
  ~Program() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (fd_ >= 0) ::close(fd_);
  }
  bool started() const { return pid_ > 0; }

  // Reads output until `marker` appears, the output ends or the deadline passes.
  bool read_until(const std::string& marker, Clock::time_point deadline) {
    while (fd_ >= 0 && (marker.empty() || output_.find(marker) == std::string::npos)) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
      if (left <= 0) return false;
      pollfd pfd{fd_, POLLIN, 0};
      if (::poll(&pfd, 1, static_cast<int>(left)) <= 0) continue;
      char buf[4096];
      const ssize_t n = ::read(fd_, buf, sizeof buf);
      if (n <= 0) {
        ::close(fd_);
        fd_ = -1;
        break;
      }
      output_.append(buf, static_cast<std::size_t>(n));
    }
    return marker.empty() ? fd_ < 0 : output_.find(marker) != std::string::npos;
  }
  // Waits for the exit (reading the output); kills the program at the deadline. -1 = killed.
  int wait(Clock::time_point deadline) {
    read_until("", deadline);
    if (pid_ <= 0) return -1;
    int status = 0;
    while (::waitpid(pid_, &status, WNOHANG) == 0) {
      if (Clock::now() >= deadline) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, nullptr, 0);
        pid_ = -1;
        return -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  const std::string& output() const { return output_; }

 private:
  pid_t pid_ = -1;
  int fd_ = -1;
  std::string output_;
};

std::string last_line(const std::string& text) {
  std::istringstream in(text);
  std::string line, last;
  while (std::getline(in, line)) {
    if (line.find_first_not_of(" \t*-") != std::string::npos) last = line;
  }
  return last;
}

int whole_seconds(double s) { return std::max(1, static_cast<int>(std::ceil(s))); }

// A count of messages, not -D: in duration mode perftest 6.06 on Soft-RoCE reported 0 iterations.
// -t (and -o for reads): the bench's requests in flight; at perftest's default of 128 1 MiB
// messages Soft-RoCE drops and retransmits and a run takes minutes.
std::vector<std::string> perftest_args(const std::string& tool, const CrossCheckOptions& o, std::uint16_t port) {
  std::vector<std::string> a{tool, "-R", "-F", "-s", "1048576", "-n", std::to_string(std::max(5u, o.perftest_iterations)),
                             "-t", std::to_string(o.in_flight), "-p", std::to_string(port)};
  if (tool == "ib_read_bw") a.insert(a.end(), {"-o", std::to_string(o.in_flight)});
  return a;
}
// perftest and iperf3 print through stdio: line-buffered, so their "waiting" line reaches us.
std::vector<std::string> line_buffered(std::vector<std::string> argv) {
  if (installed("stdbuf")) argv.insert(argv.begin(), {"stdbuf", "-oL"});
  return argv;
}
std::vector<std::string> iperf3_server_args(const CrossCheckOptions& o, bool one_off) {
  std::vector<std::string> a{"iperf3", "-s", "-p", std::to_string(o.iperf3_port)};
  if (one_off) a.push_back("-1");
  return a;
}

// One client run, with a server of our own first when the host is this host.
void run_one(CrossCheck& c, const std::vector<std::string>& client, const std::vector<std::string>& server,
             const std::string& ready_marker, double seconds, double (*parse)(const std::string&)) {
  c.command = joined(client);
  if (!installed(client[0])) {
    c.skipped = client[0] + " is not installed";
    return;
  }
  const auto deadline = Clock::now() + std::chrono::seconds(whole_seconds(seconds) + 60);
  std::unique_ptr<Program> srv;
  if (!server.empty()) {
    srv = std::make_unique<Program>(line_buffered(server));
    if (!srv->started() || !srv->read_until(ready_marker, Clock::now() + std::chrono::seconds(20))) {
      c.skipped = "the local server `" + joined(server) + "` did not start: " + last_line(srv->output());
      return;
    }
  }
  Program cl(client);
  const int rc = cl.wait(deadline);
  if (srv) srv->wait(Clock::now() + std::chrono::seconds(5));
  c.mb_s = parse(cl.output());
  if (c.mb_s <= 0) {
    c.mb_s = -1;
    c.skipped = "`" + c.command + "` " + (rc < 0 ? "timed out" : "exited " + std::to_string(rc)) + ": " +
                last_line(cl.output());
    if (!c.server_command.empty()) c.skipped += " (is `" + c.server_command + "` running on the target?)";
  }
}

}  // namespace

double parse_perftest_bw(const std::string& output) {
  std::istringstream in(output);
  std::string line;
  bool header = false, gbits = false;
  while (std::getline(in, line)) {
    if (line.find("BW average") != std::string::npos) {
      header = true;
      gbits = line.find("Gb/sec") != std::string::npos;
      continue;
    }
    if (!header) continue;
    std::istringstream f(line);
    double bytes = 0, iters = 0, peak = 0, avg = 0;
    if (f >> bytes >> iters >> peak >> avg && bytes > 0) return avg > 0 ? (gbits ? avg * 125.0 : avg * kPerftestMiB) : -1;
  }
  return -1;
}

double parse_iperf3_json(const std::string& output) {
  const auto start = output.find('{');
  if (start == std::string::npos) return -1;
  const auto j = nlohmann::json::parse(output.substr(start), nullptr, false);
  if (j.is_discarded()) return -1;
  const auto* bps = &j;
  for (const char* k : {"end", "sum_received", "bits_per_second"}) {
    if (!bps->is_object() || !bps->contains(k)) return -1;
    bps = &(*bps)[k];
  }
  return bps->is_number() ? bps->get<double>() / 8e6 : -1;
}

std::string cross_check_server_commands(const CrossCheckOptions& o) {
  std::string s;
  if (o.rdma) {
    s += joined(perftest_args("ib_write_bw", o, o.ib_write_port)) + " &\n";
    s += joined(perftest_args("ib_read_bw", o, o.ib_read_port)) + " &\n";
  }
  if (o.tcp) s += joined(iperf3_server_args(o, false)) + " &\n";
  return s;
}

std::vector<CrossCheck> run_cross_checks(const CrossCheckOptions& o) {
  std::vector<CrossCheck> out;
  if (o.rdma) {
    for (const auto& [tool, dir, port] : {std::tuple{"ib_write_bw", "write", o.ib_write_port},
                                          std::tuple{"ib_read_bw", "read", o.ib_read_port}}) {
      CrossCheck c{tool, "rdma", dir};
      const auto server = perftest_args(tool, o, port);
      auto client = server;
      client.push_back(o.host);
      if (!o.start_servers) c.server_command = joined(server);
      run_one(c, client, o.start_servers ? server : std::vector<std::string>{}, "Waiting for client", o.seconds,
              &parse_perftest_bw);
      out.push_back(c);
    }
  }
  if (o.tcp) {
    for (const char* dir : {"write", "read"}) {
      CrossCheck c{"iperf3", "tcp", dir};
      std::vector<std::string> client{"iperf3", "-c", o.host, "-p", std::to_string(o.iperf3_port), "-t",
                                      std::to_string(whole_seconds(o.seconds)), "-J"};
      if (std::strcmp(dir, "read") == 0) client.push_back("-R");  // the target sends
      if (!o.start_servers) c.server_command = joined(iperf3_server_args(o, false));
      run_one(c, client, o.start_servers ? iperf3_server_args(o, true) : std::vector<std::string>{},
              "Server listening", o.seconds, &parse_iperf3_json);
      out.push_back(c);
    }
  }
  return out;
}

}  // namespace ibdisk::bench
