#include "proxy/server/stdin_socket.hpp"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

namespace bscache::proxy {

namespace {

std::runtime_error refused(const std::string& why) {
  return std::runtime_error("-s: " + why +
                            "; bscache serves one client over a connected socket given as both stdin and stdout "
                            "(as nbd_connect_command and inetd pass it), or from a socket-activation socket");
}

std::string kind_of(mode_t mode) {
  if (S_ISFIFO(mode)) return "a pipe";
  if (S_ISCHR(mode)) return "a character device (a terminal or /dev/null)";
  if (S_ISREG(mode)) return "a regular file";
  return "not a socket";
}

}  // namespace

asio::generic::stream_protocol::socket take_stdin_socket(asio::io_context& io) {
  // Pipes are refused rather than served: every byte to a client leaves by
  // send/splice on one socket, and a pipe pair would need a second, write-only
  // stream. nbdkit serves pipes; no NBD client we know starts a server so.
  struct stat in {
  }, out{};
  if (::fstat(STDIN_FILENO, &in) != 0) throw refused(std::string("stdin is closed: ") + strerror(errno));
  if (!S_ISSOCK(in.st_mode)) throw refused("stdin is " + kind_of(in.st_mode));
  int listening = 0;
  socklen_t size = sizeof listening;
  if (::getsockopt(STDIN_FILENO, SOL_SOCKET, SO_ACCEPTCONN, &listening, &size) == 0 && listening) {
    throw refused("stdin is a listening socket, not a connection");
  }
  if (::fstat(STDOUT_FILENO, &out) != 0 || out.st_dev != in.st_dev || out.st_ino != in.st_ino) {
    throw refused("stdout is not the socket on stdin");
  }
  sockaddr_storage address{};
  socklen_t length = sizeof address;
  if (::getsockname(STDIN_FILENO, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    throw refused(std::string("getsockname: ") + strerror(errno));
  }
  const int fd = ::fcntl(STDIN_FILENO, F_DUPFD_CLOEXEC, 3);
  if (fd < 0) throw refused(std::string("fcntl: ") + strerror(errno));
  asio::generic::stream_protocol::socket socket(io);
  boost::system::error_code ec;
  socket.assign(asio::generic::stream_protocol(address.ss_family, 0), fd, ec);
  if (ec) {
    ::close(fd);
    throw refused("cannot use the socket: " + ec.message());
  }
  // Best effort: if /dev/null cannot be opened, fd 0 stays a second reference
  // to the socket, which only delays the client seeing our close until exit.
  if (const int null = ::open("/dev/null", O_RDONLY | O_CLOEXEC); null >= 0) {
    ::dup2(null, STDIN_FILENO);
    ::close(null);
  }
  ::dup2(STDERR_FILENO, STDOUT_FILENO);
  return socket;
}

}  // namespace bscache::proxy
