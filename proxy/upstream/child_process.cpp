#include "proxy/upstream/child_process.hpp"

#include <fcntl.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string_view>
#include <thread>

extern char** environ;

namespace bscache::proxy {

namespace {
std::runtime_error system_failure(const std::string& what, int error = errno) {
  return std::runtime_error("--upstream-command: " + what + ": " + strerror(error));
}

// The descriptor systemd's protocol passes first (SD_LISTEN_FDS_START).
constexpr int kListenFd = 3;

// A listening Unix socket at `path`, never at descriptor 3 (dup2 onto itself
// would keep its close-on-exec flag, and the child would lose it).
int listen_unix(const std::string& path) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.size() >= sizeof address.sun_path) throw std::runtime_error("--upstream-command: socket path too long");
  std::memcpy(address.sun_path, path.c_str(), path.size() + 1);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw system_failure("socket");
  if (fd == kListenFd) {
    const int moved = ::fcntl(fd, F_DUPFD_CLOEXEC, kListenFd + 1);
    ::close(fd);
    if (moved < 0) throw system_failure("fcntl");
    fd = moved;
  }
  if (::bind(fd, reinterpret_cast<const sockaddr*>(&address), sizeof address) != 0 || ::listen(fd, SOMAXCONN) != 0) {
    const int error = errno;
    ::close(fd);
    throw system_failure("listening on " + path, error);
  }
  return fd;
}

// Our environment without systemd's listen variables, plus LISTEN_FDS=1.
std::vector<std::string> child_environment() {
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) {
    const std::string_view entry(*e);
    if (entry.starts_with("LISTEN_PID=") || entry.starts_with("LISTEN_FDS=") || entry.starts_with("LISTEN_FDNAMES=")) {
      continue;
    }
    env.emplace_back(entry);
  }
  env.emplace_back("LISTEN_FDS=1");
  return env;
}

std::vector<char*> pointers(std::vector<std::string>& strings) {
  std::vector<char*> out;
  out.reserve(strings.size() + 1);
  for (auto& s : strings) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}
}  // namespace

UpstreamChild::UpstreamChild(const std::vector<std::string>& command) {
  if (command.empty()) throw std::runtime_error("--upstream-command: empty command");
  std::string pattern = (std::filesystem::temp_directory_path() / "bscache-upstreamXXXXXX").string();
  if (!mkdtemp(pattern.data())) throw system_failure("mkdtemp");
  dir_ = pattern;
  socket_path_ = (dir_ / "upstream.sock").string();
  int listener = -1;
  try {
    listener = listen_unix(socket_path_);
  } catch (...) {
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
    throw;
  }
  // LISTEN_PID must be the server's own pid, known only in the child: a
  // shell sets it and execs the command, keeping its pid.
  std::vector<std::string> args{"/bin/sh", "-c", "LISTEN_PID=$$; export LISTEN_PID; exec \"$@\"", "bscache-upstream"};
  args.insert(args.end(), command.begin(), command.end());
  std::vector<std::string> env = child_environment();
  auto argv = pointers(args);
  auto envp = pointers(env);
  const int null = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  const pid_t self = ::getpid();
  // fork + exec rather than posix_spawn, for the prctl: posix_spawn cannot
  // set a parent-death signal.
  pid_ = ::fork();
  if (pid_ == 0) {
    // Only async-signal-safe calls from here to exec: other threads may hold locks.
    ::dup2(listener, kListenFd);  // the copy is not close-on-exec
    // stdin and stdout are not the server's: with -s they are a client's
    // connection, and --run's command owns stdout.
    if (null >= 0) ::dup2(null, STDIN_FILENO);
    ::dup2(STDERR_FILENO, STDOUT_FILENO);
    // If bscache dies without stopping it (SIGKILL), the server goes too:
    // nobody else knows its private socket. SIGTERM, so it exits cleanly. The
    // signal follows the thread that forked, the main thread, which lives as
    // long as bscache. A bscache already gone before prctl: exit now.
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != self) ::_exit(127);
    ::execve("/bin/sh", argv.data(), envp.data());
    ::_exit(127);
  }
  const int error = errno;
  if (null >= 0) ::close(null);
  // The server holds the listener now. Not keeping it here means a server
  // that died refuses connections instead of leaving them queued forever.
  ::close(listener);
  if (pid_ < 0) {
    pid_ = -1;
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
    throw system_failure("cannot start /bin/sh", error);
  }
  spdlog::debug("upstream command started (pid {}), listening on {}", pid_, socket_path_);
}

UpstreamChild::~UpstreamChild() {
  if (pid_ > 0) {
    ::kill(pid_, SIGTERM);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    int status = 0;
    while (::waitpid(pid_, &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() >= deadline) {
        spdlog::warn("upstream command (pid {}) ignored SIGTERM for 5 s: killing it", pid_);
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, &status, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  std::error_code ignored;
  std::filesystem::remove_all(dir_, ignored);
}

std::string UpstreamChild::uri(bool tls) const {
  return std::string(tls ? "nbds+unix" : "nbd+unix") + ":///?socket=" + socket_path_;
}

}  // namespace bscache::proxy
