#include "server/connection_probe.h"

#include <dirent.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <cstdlib>
#include <cstring>

namespace cortex::server {

namespace {

int portOf(const sockaddr_storage& a) {
  if (a.ss_family == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in&>(a).sin_port);
  if (a.ss_family == AF_INET6) return ntohs(reinterpret_cast<const sockaddr_in6&>(a).sin6_port);
  return -1;
}

}  // namespace

std::optional<ConnectionProbe> ConnectionProbe::find(int localPort, const std::string& remoteAddr,
                                                     int remotePort) {
  if (localPort <= 0 || remotePort <= 0) return std::nullopt;
  DIR* dir = opendir("/proc/self/fd");
  if (!dir) return std::nullopt;
  std::optional<ConnectionProbe> found;
  while (const dirent* e = readdir(dir)) {
    char* end = nullptr;
    const long fd = std::strtol(e->d_name, &end, 10);
    if (end == e->d_name || *end != '\0' || fd == dirfd(dir)) continue;
    const int sock = static_cast<int>(fd);
    sockaddr_storage local{}, peer{};
    socklen_t localLen = sizeof local, peerLen = sizeof peer;
    if (getsockname(sock, reinterpret_cast<sockaddr*>(&local), &localLen) != 0) continue;
    if (portOf(local) != localPort) continue;
    if (getpeername(sock, reinterpret_cast<sockaddr*>(&peer), &peerLen) != 0) continue;
    if (portOf(peer) != remotePort) continue;
    char host[NI_MAXHOST];
    if (getnameinfo(reinterpret_cast<sockaddr*>(&peer), peerLen, host, sizeof host, nullptr, 0,
                    NI_NUMERICHOST) != 0 ||
        remoteAddr != host) {
      continue;
    }
    found = ConnectionProbe(sock);
    break;
  }
  closedir(dir);
  return found;
}

bool ConnectionProbe::peerClosed() const {
  pollfd p{fd_, static_cast<short>(POLLRDHUP), 0};
  if (poll(&p, 1, 0) <= 0) return false;
  return (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0;
}

}  // namespace cortex::server
