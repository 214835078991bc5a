#pragma once
// The initiator's client library: one session with a target, made of several queues (one
// connection each), with an asynchronous API: read, write, flush, trim and write-zeroes take a
// completion callback; many requests may be in flight per queue (more than the granted queue
// depth wait in the queue's backlog).
//
// Threads: a Client and its callbacks belong to the thread that calls run_until(); every
// method is called from that thread.
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "proto/ibdisk.pb.h"
#include "proto/wire.h"
#include "transport/connection.h"
#include "transport/tcp/asio.h"

namespace ibdisk::initiator {

inline constexpr std::uint16_t kDefaultPort = 7420;

struct ClientOptions {
  std::string host;
  std::uint16_t port = kDefaultPort;
  std::string key_file;     // empty: no key
  unsigned queues = 1;
  unsigned queue_depth = 32;
  std::uint32_t max_io = wire::kMaxIoSize;
  std::chrono::milliseconds timeout{10000};
  // Liveness (protocol version 3; docs/attach.md, TIMEOUTS): a queue on which nothing arrived
  // for `heartbeat` sends one (the target answers at once, even while its disk is slow); a
  // queue with anything outstanding on which nothing arrived for `io_timeout` is lost, and
  // reconnects and resends like any lost queue. TCP sockets also get io_timeout as their user
  // timeout and keepalive. 0 turns either off.
  std::chrono::milliseconds heartbeat{5000};
  std::chrono::milliseconds io_timeout{15000};
  std::string client_name;
  // "auto": RDMA when it connects within a short timeout, else TCP (logging why in one line);
  // "rdma": RDMA or an error; "tcp": TCP only.
  std::string transport = "auto";
  std::uint16_t rdma_port = 0;  // RDMA CM port; 0: the same number as `port`
  std::chrono::milliseconds rdma_timeout{2500};  // for the RDMA attempt of each queue
  // Nonzero: this Client's queues join that session (another Client's, on another thread, whose
  // open handles they then share) instead of starting a new one; join_secret is that Client's
  // session_secret(), without which the target refuses the join.
  std::uint64_t join_session = 0;
  std::string join_secret;
  // The transports to use instead of RDMA (primary) and TCP (fallback), e.g. the loopback
  // transport of the tests; null: the built-in ones.
  std::shared_ptr<transport::Connector> primary;
  std::shared_ptr<transport::Connector> fallback;
};

// "HOST", "HOST:PORT", "[V6]:PORT" into host and port (port unchanged when absent).
// Throws std::invalid_argument naming the bad part.
void parse_host_port(const std::string& text, std::string* host, std::uint16_t* port);

// "HOST[:PORT]/EXPORT" or "ibdisk://HOST[:PORT]/EXPORT".
struct RemoteName {
  std::string host;
  std::uint16_t port = kDefaultPort;
  std::string export_name;
};
bool parse_remote(const std::string& text, RemoteName* out);

using Callback = std::function<void(int status)>;  // 0 or -errno

class Client {
 public:
  // Connects every queue and authenticates. Throws SystemError with the target's own
  // explanation when it refuses (wrong key, not allowed, version).
  static std::unique_ptr<Client> connect(const ClientOptions& opts);
  ~Client();

  std::vector<proto::ExportInfo> list_exports();
  proto::Stats stats();
  // Opens an export for this session; the handle goes into I/O calls. Throws SystemError on
  // refusal (unknown export, read-only, busy), with the target's message.
  proto::Opened open(const std::string& name, bool read_only);
  // Closes a handle from open() on every queue of the session (a Close call on queue 0),
  // releasing the export once the commands using it are done. Throws SystemError with the
  // target's message when it refuses (unknown handle).
  void close(std::uint32_t handle);

  unsigned queue_count() const;
  unsigned queue_depth(unsigned q) const;
  std::uint32_t max_io() const;
  std::string transport(unsigned q) const;
  std::uint64_t session_id() const;
  // What another Client needs, beside the id, to join this session (ClientOptions::join_secret).
  const std::string& session_secret() const { return session_secret_; }
  // Commands resent on a new connection after one was lost, since the Client started.
  std::uint64_t resent() const { return resent_; }
  // Heartbeats sent, and connections declared lost for silence (io_timeout), since the Client started.
  std::uint64_t heartbeats() const { return heartbeats_; }
  std::uint64_t silent_losses() const { return silent_losses_; }
  // The name the target was given (`serve --name`), its control characters replaced; may be empty.
  const std::string& server_name() const { return server_name_; }
  // Why RDMA is not carrying the session (empty when it is, or when TCP was asked for).
  const std::string& rdma_not_used() const { return rdma_not_used_; }

  void read(unsigned q, std::uint32_t handle, std::uint64_t offset, std::uint32_t length, std::byte* buf, Callback cb);
  void write(unsigned q, std::uint32_t handle, std::uint64_t offset, std::uint32_t length, const std::byte* buf,
             std::uint32_t flags, Callback cb);
  void flush(unsigned q, std::uint32_t handle, Callback cb);
  void trim(unsigned q, std::uint32_t handle, std::uint64_t offset, std::uint32_t length, Callback cb);
  void write_zeroes(unsigned q, std::uint32_t handle, std::uint64_t offset, std::uint32_t length, std::uint32_t flags,
                    Callback cb);
  // Where data is in [offset, offset + length): runs contiguous from offset that may end before
  // offset + length (ask again from where they end). Only on exports whose Opened.extents is
  // set. A reply that breaks the wire rules completes with -EPROTO. See initiator/extents.h.
  using ExtentsCallback = std::function<void(int status, const wire::ExtentList& list)>;
  void extents(unsigned q, std::uint32_t handle, std::uint64_t offset, std::uint32_t length, ExtentsCallback cb);

  // Memory the caller's I/O buffers come from: registered with every RDMA connection of the
  // session (this one's and later ones'), so data moves straight to and from it. Buffers outside
  // it still work, through bounce buffers. The memory must outlive the Client.
  void register_memory(std::byte* base, std::size_t length);
  // Reads and writes whose data went through the current connections' bounce buffers.
  std::uint64_t bounced() const;

  // Runs completions until done() holds. Throws SystemError when a queue is lost.
  void run_until(const std::function<bool()>& done);
  unsigned in_flight() const;
  // The loop run_until() runs: a caller may watch its own descriptors on it (initiator/attach).
  boost::asio::io_context& io_context() { return io_; }

 private:
  Client() = default;
  struct Queue;
  // A connection admitted into the session, and what the target said of it.
  struct Admitted {
    std::unique_ptr<transport::ClientConnection> conn;
    bool primary = false;        // carried by the primary transport (RDMA)
    unsigned depth = 0;
    std::uint32_t queue_id = 0;  // the target's number for it (Hello.replaces_queue)
    std::uint32_t version = 0;   // the protocol version the target chose
  };
  void submit(unsigned q, const wire::Command& cmd, std::byte* buf, Callback cb);
  void dispatch(Queue& queue);
  void ensure_started();
  // Connects one queue and admits it into the session (a new session while session_id_ is 0):
  // the primary transport first when `primary`, then the fallback when `fallback`. No
  // connection, with *why_not, when neither was allowed to work; throws SystemError when the
  // target refuses. `replaces`: the id of the lost queue this one takes over, or 0.
  Admitted open_queue(bool primary, bool fallback, std::chrono::milliseconds primary_timeout, std::uint32_t replaces,
                      std::string* why_not);
  // Hello, Auth, Welcome on a new connection: joins (or starts) the session. Throws SystemError.
  void admit(transport::ClientConnection& conn, std::uint32_t replaces, Admitted* out);
  void start_conn(Queue& q, transport::ClientConnection* conn);
  // A lost queue's new connection: joins the session, or, when the target has already ended
  // it (every queue went down at once), starts a new one and opens the exports again.
  Admitted reconnect_queue(std::uint32_t replaces);
  // Sends a command with the handle the target knows now. 0 or -errno.
  int send(transport::ClientConnection& conn, const wire::Command& cmd, std::byte* buf);
  // A queue's connection ended mid-session: move its commands to a new connection (auto).
  void on_conn_lost(Queue& q, transport::ClientConnection* conn, const transport::CloseReason& reason);
  void retire(std::unique_ptr<transport::ClientConnection> conn);
  // While some queue runs on TCP (auto), tries RDMA again now and then and moves it back.
  void probe_rdma();
  // Sends heartbeats on quiet queues and declares silent ones lost; from run_until's loop.
  void check_liveness();
  // Open a queue on the transports opts_.transport allows; throws when none works.
  Admitted open_allowed(std::uint32_t replaces);

  boost::asio::io_context io_;
  ClientOptions opts_;
  std::shared_ptr<transport::Connector> primary_, fallback_;
  std::vector<std::unique_ptr<Queue>> queues_;
  std::uint64_t session_id_ = 0;
  std::string session_secret_;
  std::uint64_t resent_ = 0;
  std::uint64_t heartbeats_ = 0, silent_losses_ = 0;
  std::chrono::steady_clock::time_point next_liveness_{};
  std::uint32_t max_io_ = 0;
  bool started_ = false;
  std::string lost_;  // why a queue was lost, once it was
  bool session_unknown_ = false;  // the last admit() was refused: the target ended the session
  // Every open(), in order: callers keep the first handle; a new session maps it to its own.
  struct OpenedExport {
    std::string name;
    bool read_only;
    std::uint32_t handle;   // what the caller was given
    std::uint32_t current;  // what the target knows now
  };
  std::vector<OpenedExport> opened_;
  bool handles_moved_ = false;
  std::string rdma_not_used_;
  std::string server_name_;
  struct Memory {
    std::byte* base;
    std::size_t length;
  };
  std::vector<Memory> memory_;  // register_memory()
  void add_memory(transport::ClientConnection& conn, const Memory& m);
  bool memory_warned_ = false;
  std::string key_;
  std::chrono::steady_clock::time_point next_probe_{};
  // One reconnection (or RDMA probe) at a time: connecting and the handshake run io_, where
  // other queues' losses arrive; those wait here and run after it, one by one, so they never
  // see a session half replaced nor change it under a handshake in progress.
  bool reconnecting_ = false;
  std::vector<std::function<void()>> after_reconnect_;
  class Reconnecting;
  // Closed TCP connections whose handlers may still be queued on io_; freed with the client.
  std::vector<std::unique_ptr<transport::ClientConnection>> retired_;
};

// Turns a control reply that carries an Error into a SystemError naming `what`.
void throw_if_error(const proto::Control& reply, const std::string& what);

}  // namespace ibdisk::initiator
