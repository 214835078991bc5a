#pragma once
// The target's NBD front end (docs/nbd.md): plain NBD clients (kernel nbd-client, qemu,
// nbdinfo, nbdcopy) use ibdisk exports over TCP. One io_context, any number of connections;
// each does the fixed newstyle handshake (handshake.h), then serves READ, WRITE, FLUSH, TRIM
// and WRITE_ZEROES (with FUA) through the StorageEngine, many requests in flight, replies sent
// as they complete. Exports and their rules (read-only, exclusive writer, shared) come from
// the ExportRegistry; peers outside the NetworkAllowList are refused at accept, and over
// loopback only the server's own user and root are served (NbdServerOptions::any_local_user).
#include <cstddef>
#include <cstdint>
#include <memory>

#include "target/acl.h"
#include "target/exports.h"
#include "target/storage.h"
#include "transport/tcp/asio.h"

namespace ibdisk::nbd {

namespace detail {
struct NbdServerState;
}
class NbdTls;

// The IANA port for NBD.
inline constexpr std::uint16_t kDefaultPort = 10809;

struct NbdServerOptions {
  // Requests per connection at the storage engine at once; further requests wait in the socket.
  unsigned max_in_flight = 64;
  // READ/WRITE payload bytes a connection holds before it stops reading requests.
  std::size_t max_buffered = 64u << 20;
  // A client that has not finished the handshake after this long is dropped.
  unsigned handshake_timeout_s = 30;
  // NBD has no authentication of its own: a client over loopback must be this process's user
  // or root (the server refuses every export to anyone else), unless any local user may
  // (serve --insecure).
  bool any_local_user = false;
  // TLS (tls.h): when set, required of every client (NBD_OPT_STARTTLS before any other
  // option), and the key, not the local user, is what admits a client.
  std::shared_ptr<NbdTls> tls;
};

class NbdServer {
 public:
  // Binds and listens now (port 0: the kernel picks one, see port()). Throws SystemError
  // naming the endpoint, the reason and the fix (port in use, address not on this host).
  // `engine` must be the storage engine driven by `io`, which runs on one thread. `exports`
  // must outlive the server and the engine: a connection closed while its requests are still
  // at the engine releases its export when they complete.
  NbdServer(boost::asio::io_context& io, target::ExportRegistry& exports, target::StorageEngine& engine,
            target::NetworkAllowList allow, boost::asio::ip::tcp::endpoint listen, NbdServerOptions opts = {});
  // On the io thread, or once the io_context no longer runs: stops as stop() does.
  ~NbdServer();
  NbdServer(const NbdServer&) = delete;
  NbdServer& operator=(const NbdServer&) = delete;

  std::uint16_t port() const;
  // Any thread: stops accepting and closes every connection (posted to the io_context).
  // Requests already at the storage engine complete; their export leases are released then.
  void stop();
  // io thread: connections currently open.
  std::size_t connections() const;

 private:
  std::shared_ptr<detail::NbdServerState> state_;  // shared with the connections
};

}  // namespace ibdisk::nbd
