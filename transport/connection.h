#pragma once
// The one transport interface, in its two roles, and the factories behind it. target/ and
// initiator/ use only this header; transport/tcp (Boost.Asio), transport/rdma (verbs) and
// transport/loopback (in memory, with a fault injector) implement it.
//
// A connection is one queue. Control messages (protobuf, proto/ibdisk.proto) are exchanged at
// setup; then the data plane carries fixed-size capsules (proto/wire.h). Transports move bytes
// and report events; they decide nothing about a command (target/request.h does):
// - Target: the handler receives each command capsule. A write's payload moves only when the
//   target asks for it with receive_data() (TCP: from the stream, which waits for that call;
//   RDMA: an RDMA READ), into a slot the target chose; send_reply() sends the completion (and a
//   read's data from the slot, by TCP payload or RDMA WRITE).
// - Initiator: submit(command, buffer) sends a command; a write's data is taken from the
//   buffer, a read's data lands in it; the completion handler runs with the tag and status.
// Threads: every method runs on the connection's io_context thread, which also runs the
// handlers. Setup-path methods throw SystemError; data-path methods return -errno.
#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "proto/ibdisk.pb.h"
#include "proto/wire.h"
#include "transport/tcp/asio.h"

namespace ibdisk::transport {

// The target's data buffer for one command.
struct Slot {
  std::byte* data = nullptr;
  std::uint32_t capacity = 0;
  int fixed_index = -1;  // io_uring fixed-buffer index covering data, or -1
};

// Why a connection ended: a code to act on, and a detail for people.
enum class CloseCode : std::uint8_t {
  kPeerClosed,     // the peer closed or disconnected in order
  kLocal,          // this side closed or aborted it
  kProtocol,       // the peer broke the protocol
  kNetwork,        // a network error: reset, failed send or receive, unreachable
  kDeviceRemoved,  // the RDMA device or its address went away
  kTimeout,        // the peer did not answer in time
};
struct CloseReason {
  CloseCode code = CloseCode::kLocal;
  std::string detail;
  // The connection was lost with its network, not ended by either side: worth a rejoin.
  bool lost() const {
    return code == CloseCode::kNetwork || code == CloseCode::kDeviceRemoved || code == CloseCode::kTimeout;
  }
};

// Who is on the other end, as far as the transport knows.
struct PeerInfo {
  std::string text;                                // "10.0.0.2:51234", for logs
  std::optional<boost::asio::ip::address> address;  // for the allow-list
  std::optional<uid_t> uid;                        // the local user behind a loopback peer, when known
};

// One command's data movement on the target side (target/request.h's Request). The transport
// calls back exactly once per receive_data() and per send_reply(), on the io thread, possibly
// before the call returns; once the connection has ended, at once, with a negative status.
class DataOp {
 public:
  wire::Command cmd;  // as it arrived
  Slot slot;          // where its data lives on the target; data == nullptr: no buffer (skip a payload)
  virtual void data_received(int status) = 0;  // 0: the payload is in slot (or skipped)
  virtual void reply_sent(int status) = 0;     // the reply is out (or never will be): slot is free again

 protected:
  ~DataOp() = default;
};

// Target side of one queue.
class ServerConnection {
 public:
  struct Handler {
    virtual ~Handler() = default;
    virtual void on_control(const proto::Control& msg) = 0;
    // A command capsule whose syntax is checked. False: the handler cannot take it now; the
    // transport keeps it, delivers nothing else, and delivers it again after resume().
    // A write's payload stays on the wire until receive_data() for it.
    virtual bool on_command(const wire::Command& cmd) = 0;
    // The connection is gone; no DataOp is called back after this.
    virtual void on_closed(const CloseReason& reason) = 0;
  };
  virtual ~ServerConnection() = default;
  virtual std::string transport_name() const = 0;
  virtual PeerInfo peer() const = 0;
  // Starts delivering to handler, which must outlive the connection's activity.
  virtual void start(Handler* handler) = 0;
  virtual void send_control(const proto::Control& msg) = 0;
  // The queue is admitted (authenticated): it may carry `depth` commands of at most `max_io`
  // bytes. Buffers that stay small before authentication grow now. Returns the depth this
  // connection can carry, at most `depth`.
  virtual unsigned admit(unsigned depth, std::uint32_t max_io) = 0;
  virtual void receive_data(DataOp& op) = 0;
  // The completion: status, and for a successful read `length` bytes from op.slot.
  virtual void send_reply(DataOp& op, std::int32_t status, std::uint32_t length) = 0;
  // After on_command() returned false: the handler can take commands again.
  virtual void resume() = 0;
  // Closes after queued output is sent.
  virtual void close() = 0;
  // Closes now, dropping queued output (a peer that does not read, a fenced queue).
  virtual void abort(const std::string& why) = 0;
};

// Where an accepted connection lives: one target worker (its loop, its RDMA registrations).
class RdmaDeviceCache;
struct AcceptContext {
  boost::asio::io_context* io = nullptr;
  RdmaDeviceCache* rdma = nullptr;
  void* owner = nullptr;  // the target's worker
};

// Accepts connections of one transport on one address. Construction binds (throws SystemError
// naming the address, the reason and the fix); close() stops it, on its io thread.
class Listener {
 public:
  // Picks the worker for the next connection; runs on the listener's thread.
  using NextWorker = std::function<AcceptContext&()>;
  // A new connection, on its worker's thread. Not started yet.
  using OnAccept = std::function<void(AcceptContext& where, std::shared_ptr<ServerConnection> conn)>;
  virtual ~Listener() = default;
  virtual std::string transport_name() const = 0;
  virtual std::uint16_t port() const = 0;
  virtual std::string description() const = 0;  // e.g. "127.0.0.1:7420"
  virtual void close() = 0;
};

// Initiator side of one queue.
class ClientConnection {
 public:
  using CompletionHandler = std::function<void(const wire::Completion& completion)>;
  using ClosedHandler = std::function<void(const CloseReason& reason)>;
  virtual ~ClientConnection() = default;
  virtual std::string transport_name() const = 0;
  virtual std::string peer() const = 0;
  // Setup phase, blocking: sends a control message and returns the reply. Throws on I/O error
  // or timeout.
  virtual proto::Control call(const proto::Control& request) = 0;
  // Data phase: after this, completions arrive on the io_context.
  virtual void start(CompletionHandler on_complete, ClosedHandler on_closed) = 0;
  // Sends a command. For a write, buffer holds cmd.length bytes to send; for a read, it
  // receives them. buffer must stay valid until the completion. Returns 0 or -errno.
  virtual int submit(const wire::Command& cmd, std::byte* buffer) = 0;
  virtual void close() = 0;
};

// The RDMA-only part of an initiator connection (dynamic_cast from ClientConnection).
class RegisteredMemory {
 public:
  // Memory the caller will pass to submit(): registered, so the target reads and writes
  // buffers inside it directly instead of through bounce buffers. Setup path; false (with
  // *why) when it cannot, and I/O still works through the bounce buffers.
  virtual bool add_memory(std::byte* base, std::size_t length, std::string* why) = 0;
  // Reads and writes whose data was copied through a bounce buffer.
  virtual std::uint64_t bounced() const = 0;

 protected:
  ~RegisteredMemory() = default;
};

struct ConnectOptions {
  unsigned queue_depth = 32;
  std::uint32_t max_io = wire::kMaxIoSize;
  std::chrono::milliseconds connect_timeout{2500};
  std::chrono::milliseconds call_timeout{10000};  // each control call afterwards
  // How long the kernel keeps a TCP connection whose peer stopped acknowledging or answering
  // keepalives (TCP_USER_TIMEOUT, keepalive probes within it); 0: the kernel's defaults.
  std::chrono::milliseconds peer_timeout{0};
};

// Makes initiator connections of one transport.
class Connector {
 public:
  virtual ~Connector() = default;
  virtual std::string transport_name() const = 0;
  // Null with *why_not (one line a user understands) when this transport cannot carry the
  // queue (no RDMA device, no route, rejected, timeout); throws SystemError when the target
  // cannot be reached at all (refused, unresolvable).
  virtual std::unique_ptr<ClientConnection> connect(boost::asio::io_context& io, const std::string& host,
                                                    std::uint16_t port, const ConnectOptions& opts,
                                                    std::string* why_not) = 0;
};

// The built-in transports.
std::shared_ptr<Connector> tcp_connector();
std::shared_ptr<Connector> rdma_connector();
// Binds a TCP listener (port 0 picks one) on `io`'s thread. `peer_timeout`: as
// ConnectOptions::peer_timeout, for every accepted connection.
std::unique_ptr<Listener> listen_tcp(boost::asio::io_context& io, const std::string& address, std::uint16_t port,
                                     Listener::NextWorker next, Listener::OnAccept on_accept,
                                     std::chrono::milliseconds peer_timeout = std::chrono::milliseconds(0));
// Binds an RDMA CM listener; throws SystemError when the address is not on an RDMA interface.
std::unique_ptr<Listener> listen_rdma(boost::asio::io_context& io, const std::string& address, std::uint16_t port,
                                      Listener::NextWorker next, Listener::OnAccept on_accept);

// Runs io until done() or timeout; returns done(). For the blocking setup phase.
bool run_until(boost::asio::io_context& io, const std::function<bool()>& done, std::chrono::milliseconds timeout);

}  // namespace ibdisk::transport
