// Noticing that an HTTP client went away while its request is still generating.
//
// cpp-httplib 0.11 gives handlers no access to the connection's socket, and a write to a socket
// whose peer has closed succeeds once before failing, so waiting for a failed write notices a
// disconnect only two engine events later (and never for a request still queued, which writes
// nothing). Instead we find the accepted socket by its address pair (unique among open
// connections) while the handler runs on the thread that owns it, and poll it for the peer's FIN.
#pragma once

#include <optional>
#include <string>

namespace cortex::server {

class ConnectionProbe {
 public:
  // The open socket of this process whose local port is localPort and whose peer is
  // remoteAddr:remotePort (numeric address, as httplib reports it); nullopt when none matches.
  // Valid for as long as the connection stays open (the fd is not reused before httplib closes
  // it, which happens only after the response, streamed or not, is done).
  static std::optional<ConnectionProbe> find(int localPort, const std::string& remoteAddr,
                                             int remotePort);

  // True when the peer has closed (or reset) the connection. Never blocks.
  bool peerClosed() const;

 private:
  explicit ConnectionProbe(int fd) : fd_(fd) {}
  int fd_;
};

}  // namespace cortex::server
