#pragma once
// The link self-test behind `ibdisk selftest`: two peers exchange SEND/RECV messages, move
// a buffer each way (RDMA WRITE and RDMA READ, or a TCP stream each way), compare SHA-256
// checksums on both sides, measure bandwidth and disconnect cleanly.
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "transport/rdma/verbs.h"

namespace ibdisk {

struct SelftestOptions {
  std::string address;  // client: peer to connect to; server: address to listen on
  std::string source;   // client only: local address to bind (selects the RDMA device)
  std::uint16_t port = 7471;
  std::size_t size = 1 << 20;  // bytes per transfer
  unsigned iterations = 32;    // transfers each way, for the bandwidth figure
  std::chrono::milliseconds timeout{5000};
};

struct SelftestReport {
  std::string transport;  // "rdma" or "tcp"
  std::string peer;
  rdma::PortInfo port;    // rdma only
  double write_mib_s = 0;  // client -> server
  double read_mib_s = 0;   // server -> client
  std::string write_sha256, read_sha256;
  bool checksums_match = false;
};

// Listens on RDMA CM and serves self-test clients one after another. Binds in the
// constructor (so a client may connect as soon as it returns); serve() runs the loop.
class RdmaSelftestServer {
 public:
  explicit RdmaSelftestServer(const SelftestOptions& opts);
  ~RdmaSelftestServer();
  // Serves max_clients clients (0 = forever). Each client's failure is logged and the
  // server goes on. Returns the number of clients whose checksums matched.
  unsigned serve(unsigned max_clients);
  rdma::PortInfo port_info() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

SelftestReport rdma_selftest_client(const SelftestOptions& opts);

class TcpSelftestServer {
 public:
  explicit TcpSelftestServer(const SelftestOptions& opts);
  ~TcpSelftestServer();
  unsigned serve(unsigned max_clients);
  std::uint16_t port() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

SelftestReport tcp_selftest_client(const SelftestOptions& opts);

// The first local IPv4 address whose interface has an RDMA device (found by binding an RDMA
// CM id to each address), or empty.
std::string find_rdma_address();

}  // namespace ibdisk
