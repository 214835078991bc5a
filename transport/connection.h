#pragma once
// The one Connection interface, in its two roles. target/ and initiator/ use only this
// header; transport/tcp (Boost.Asio) and transport/rdma (verbs) implement it.
//
// A connection is one queue. Control messages (protobuf, proto/ibdisk.proto) are exchanged
// at setup; then the data plane carries fixed-size capsules (proto/wire.h):
// - Initiator: submit(command, buffer) sends a command; a write's data is taken from the
//   buffer, a read's data lands in it; the completion handler runs with the tag and status.
// - Target: the handler receives each command with a data slot (a write's data already in
//   it, having crossed the wire by TCP payload or RDMA READ); complete() sends the status
//   (and a read's data, by TCP payload or RDMA WRITE, from the slot).
// Threads: every method runs on the connection's io_context thread, which also runs the
// handlers. Setup-path methods throw SystemError; data-path methods return -errno.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>

#include "proto/ibdisk.pb.h"
#include "proto/wire.h"

namespace ibdisk::transport {

// The target's data buffer for one command.
struct Slot {
  std::byte* data = nullptr;
  std::uint32_t capacity = 0;
  int fixed_index = -1;  // io_uring fixed-buffer index covering data, or -1
};

// Target side of one queue.
class ServerConnection {
 public:
  struct Handler {
    virtual ~Handler() = default;
    virtual void on_control(const proto::Control& msg) = 0;
    // A command with its slot (null for flush). The slot stays the target's until complete().
    virtual void on_command(const wire::Command& cmd, Slot* slot) = 0;
    // The connection is gone (peer closed, network error, protocol violation).
    virtual void on_closed(const std::string& reason) = 0;
  };
  virtual ~ServerConnection() = default;
  virtual std::string transport_name() const = 0;
  virtual std::string peer() const = 0;
  // Starts delivering to handler. The handler must outlive the connection's activity.
  virtual void start(Handler* handler) = 0;
  virtual void send_control(const proto::Control& msg) = 0;
  // Grants the queue: allocates queue_depth slots of max_io bytes, once. Returns the depth
  // granted (possibly lower when buffers are short).
  virtual unsigned set_queue(unsigned queue_depth, std::uint32_t max_io) = 0;
  // Completes a command. For a successful read, `length` bytes of slot->data go back first.
  virtual void complete(const wire::Command& cmd, std::int32_t status, Slot* slot, std::uint32_t length) = 0;
  // Closes after queued output is sent.
  virtual void close() = 0;
};

// Initiator side of one queue.
class ClientConnection {
 public:
  using CompletionHandler = std::function<void(const wire::Completion& completion)>;
  using ClosedHandler = std::function<void(const std::string& reason)>;
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
  // Memory the caller will pass to submit(): an RDMA connection registers it, so the target
  // reads and writes buffers inside it directly instead of through bounce buffers. Setup path;
  // false (with *why) when it cannot, and I/O still works through the bounce buffers.
  virtual bool add_memory(std::byte* /*base*/, std::size_t /*length*/, std::string* /*why*/) { return true; }
  // Reads and writes whose data was copied through a bounce buffer (RDMA, outside add_memory()).
  virtual std::uint64_t bounced() const { return 0; }
};

}  // namespace ibdisk::transport
