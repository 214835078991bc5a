#pragma once
// An in-memory transport for tests, with a fault injector (Seastar's loopback_socket is the
// model). It carries the real protocol between a real target::Server and a real
// initiator::Client in one process, each on its own threads, moving data as RDMA does (the
// target copies straight from and to the initiator's buffers), so failover, resend, rejoin,
// fencing and back-pressure run on the host in milliseconds. Never a feature's only test: the
// same paths run over real TCP and, in the guest, real RDMA.
//
//   LoopbackNetwork net;
//   server.add_listener([&](auto next, auto accept) { return net.listen(next, accept); });
//   ClientOptions o; o.primary = net.connector({{Fault::Kind::kDisconnect, 40}});
//   o.fallback = net.connector();
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include "transport/connection.h"

namespace ibdisk::transport {

// What happens to the `at`-th data command (read, write, flush, trim, write-zeroes) sent
// through one connector's connections, counted together from 1. Each fault fires once.
struct Fault {
  enum class Kind : std::uint8_t {
    kDrop,        // the target never sees it
    kDelay,       // it reaches the target `delay` later (later commands may pass it)
    kReorder,     // it reaches the target after the next command
    kDuplicate,   // the target sees it twice
    kDisconnect,  // the connection is cut before it: both ends see a network loss
    kError,       // it runs, but the initiator sees `error` as its status
  };
  Kind kind = Kind::kDisconnect;
  std::uint64_t at = 1;
  std::chrono::milliseconds delay{50};
  int error = -EIO;
};

class LoopbackNetwork {
 public:
  LoopbackNetwork();
  ~LoopbackNetwork();
  LoopbackNetwork(const LoopbackNetwork&) = delete;
  LoopbackNetwork& operator=(const LoopbackNetwork&) = delete;

  // The target's side (one listener per network).
  std::unique_ptr<Listener> listen(Listener::NextWorker next, Listener::OnAccept on_accept);
  // An initiator's side. `depths`: the most each new connection's queue may be granted, in
  // order (the last repeats; empty: no limit), to shrink and grow a queue across reconnects.
  std::shared_ptr<Connector> connector(std::vector<Fault> faults = {}, std::vector<unsigned> depths = {});

  struct Counters {
    std::atomic<std::uint64_t> connections{0};  // made by every connector
    std::atomic<std::uint64_t> commands{0};     // data commands sent by initiators
    std::atomic<std::uint64_t> faults{0};       // faults that fired
    std::atomic<std::uint64_t> cuts{0};         // connections cut by a fault or cut_all()
  };
  const Counters& counters() const;
  // Cuts every live connection now, as a pulled cable does. Any thread. The initiator sees a
  // network loss; the target sees `target_sees`: kPeerClosed is what a removed RDMA device can
  // look like to it (the initiator's side disconnected in order), so it ends the session.
  void cut_all(CloseCode target_sees = CloseCode::kNetwork);

  struct State;

 private:
  std::shared_ptr<State> state_;
};

}  // namespace ibdisk::transport
