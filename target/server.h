#pragma once
// The ibdisk target: worker threads (each an io_context with its own io_uring storage
// engine and buffer pool, shared nothing), sessions made of one or more queues
// (connections), authentication, and the export rules.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "target/acl.h"
#include "target/exports.h"
#include "target/storage.h"
#include "transport/connection.h"

namespace ibdisk::target {

inline constexpr std::uint16_t kDefaultPort = 7420;

struct ServerOptions {
  std::vector<ExportConfig> exports;
  std::string listen_address;  // empty: 0.0.0.0 with a key, 127.0.0.1 without
  std::uint16_t port = kDefaultPort;
  std::string key_file;        // empty: no authentication
  bool insecure = false;       // without a key, listen beyond loopback anyway
  std::vector<std::string> allow;  // client networks (CIDR); empty: any
  unsigned threads = 2;
  unsigned buffer_mib = 128;   // data buffers per worker
  std::string server_name;
  bool rdma = true;             // also listen on RDMA CM when an RDMA device exists
  int rdma_port = -1;           // RDMA CM port (a port space of its own): -1 the TCP port, 0 any
  // A queue that has not finished its handshake (Hello, Challenge, Auth, Welcome) within this
  // time is closed, so silent or half-sent connections do not hold the target's memory.
  std::chrono::milliseconds handshake_timeout{30000};
  // stop() (SIGTERM): how long in-flight I/O and unsent replies may take to finish; then the
  // queues that did not finish are closed (and the log says so), and run() returns.
  std::chrono::milliseconds stop_timeout{10000};
  // A queue (protocol version 3) from which nothing at all was received this long (no command,
  // no heartbeat: the initiator sends one when idle) is closed as lost; the session then waits
  // kRejoinGrace for a rejoin, and ends, releasing its exports. TCP sockets also get it as
  // their user timeout and keepalive. 0: never.
  std::chrono::milliseconds session_timeout{20000};
};

// How long a session whose every queue was lost to an error (a network, device or session
// timeout) stays for the initiator to rejoin before it ends and its exports are released.
inline constexpr std::chrono::seconds kRejoinGrace{10};

class Server {
 public:
  // Opens exports, loads the key, binds. Throws SystemError / std::invalid_argument with a
  // message that names what is wrong and how to fix it.
  explicit Server(ServerOptions opts);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Serves until stop(); then lets in-flight I/O finish and returns. Any thread. An
  // exception that escapes a worker's loop (a bug) stops the target and is rethrown here.
  void run();
  // Stops accepting, completes in-flight I/O, closes every queue; queues still busy after
  // stop_timeout (a peer that does not read) are closed then. Any thread.
  void stop();
  // Accepts connections from another transport too (the loopback transport of the tests).
  // Call before run(). next/on_accept are the target's; give them to the listener's factory.
  using ListenerFactory = std::function<std::unique_ptr<transport::Listener>(transport::Listener::NextWorker,
                                                                             transport::Listener::OnAccept)>;
  void add_listener(const ListenerFactory& make);

  std::uint16_t port() const;
  // The RDMA CM port, or 0 when the target does not listen on RDMA (rdma_status() says why).
  std::uint16_t rdma_port() const;
  std::string rdma_status() const;
  std::string listen_description() const;
  ExportRegistry& exports();
  const NetworkAllowList& allow_list() const;
  unsigned worker_count() const;
  boost::asio::io_context& worker_io(unsigned i);
  StorageEngine& worker_engine(unsigned i);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ibdisk::target
