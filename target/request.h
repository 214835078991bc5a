#pragma once
// One command's life on the target, the same for every front end: an ibdisk queue over RDMA,
// TCP or the loopback transport, an NBD connection, and `bench --local`. A Request is an
// explicit state and one advance() loop (as SPDK's nvmf request is); front ends supply the
// data movement through a RequestPort and never decide anything about a command themselves.
//
//   FREE -> NEW -> NEED_SLOT -> DATA_IN -> WAIT_ORDER -> EXECUTING -> DATA_OUT -> COMPLETING -> FREE
//
// A request owns its slot, its place in the export's range lock, its storage request and its
// reply, and goes back to FREE only once its reply is out (or can never be sent), so what a
// queue can make the target hold is bounded by the number of requests it has: its depth.
// Threads: a request and its port belong to one io thread.
#include <cstdint>
#include <memory>

#include "target/range_lock.h"
#include "target/storage.h"
#include "transport/connection.h"

namespace ibdisk::target {

class Request;

// What a request needs from the front end that carried it.
class RequestPort {
 public:
  // NEW: the export a command addresses, after the front end's own checks (handle, queue
  // limits). kError: answer with req.status; kFatal: the front end has closed the connection
  // (a protocol violation), nothing is answered; kDone: the front end did all there was to do
  // (a hint, NBD_CMD_CACHE), answer with success and no storage.
  enum class Verdict { kOk, kError, kFatal, kDone };
  struct Resolved {
    Verdict verdict = Verdict::kOk;
    BackingFile* file = nullptr;
    bool writable = false;
    std::shared_ptr<const void> hold;  // keeps the export open while the request uses it
  };
  virtual Resolved resolve(Request& req) = 0;
  // NEED_SLOT: true with req.slot set, or false: the port calls req.slot_ready() later.
  virtual bool acquire_slot(Request& req) = 0;
  // A slot this request no longer needs; also called for a request cancelled while waiting.
  virtual void release_slot(Request& req) = 0;
  // DATA_IN: moves a write's payload into req.slot (or skips it when req.slot.data is null);
  // ends with req.data_received(status).
  virtual void receive_data(Request& req) = 0;
  // DATA_OUT: sends the reply (req.status, and a read's data from req.slot); ends with
  // req.reply_sent(status).
  virtual void send_reply(Request& req) = 0;
  // FREE again: the port may give the request a new command.
  virtual void request_done(Request& req) = 0;
  virtual StorageEngine& engine() = 0;
  virtual boost::asio::io_context& io() = 0;

 protected:
  ~RequestPort() = default;
};

class Request final : public transport::DataOp {
 public:
  enum class State : std::uint8_t {
    kFree,        // in its port's free list
    kNew,         // a command arrived: check export, range, permission and limits
    kNeedSlot,    // a read or write waits for a data buffer from its port
    kDataIn,      // a write's payload is arriving into the slot (TCP stream, RDMA READ, memcpy)
    kWaitOrder,   // waits on the export's range lock: no direct and buffered I/O on one page at once
    kExecuting,   // at the storage engine
    kDataOut,     // the reply (with a read's data) is going out
    kCompleting,  // the reply is out: give back slot and export, then FREE
  };

  Request() = default;
  Request(const Request&) = delete;
  Request& operator=(const Request&) = delete;

  // FREE -> NEW with this command, and runs it as far as it goes now.
  void start(RequestPort& port, const wire::Command& cmd);
  // The connection is gone, or the queue is fenced: a request not yet at the storage engine
  // goes no further, one at the engine completes there first. No reply is sent.
  void cancel();
  // The port gave the slot it could not give in acquire_slot(). `generation` is what
  // generation() said when the port queued the request: a late call for an earlier command
  // of the same Request object does nothing.
  void slot_ready(std::uint32_t generation);
  std::uint32_t generation() const { return generation_; }

  // transport::DataOp
  void data_received(int status) override;
  void reply_sent(int status) override;

  State state() const { return state_; }
  bool busy() const { return state_ != State::kFree; }
  // The reply: 0 or -errno, and bytes of read data in the slot.
  std::int32_t status = 0;
  std::uint32_t reply_length = 0;
  // Whether the request needs a buffer (read/write data, an extent list), for the port.
  bool has_data() const {
    return cmd.opcode == wire::Opcode::kRead || cmd.opcode == wire::Opcode::kWrite ||
           cmd.opcode == wire::Opcode::kExtents;
  }
  // Bytes of buffer it needs: the data, or room for an extent list (wire::buffer_size).
  std::uint32_t buffer_bytes() const { return wire::buffer_size(cmd); }
  void* port_data = nullptr;  // the port's own per-request pointer (e.g. its protocol's request)

  static const char* name(State s);

 private:
  void advance();
  void step();
  void go(State s);
  // Runs kick once per entry into the current state; true once its callback has come.
  template <class Kick>
  bool once(Kick kick);
  void on_new();
  void on_wait_order();
  void on_executing();
  static void storage_done(IoRequest* io, int result);
  static void order_granted(void* self);

  RequestPort* port_ = nullptr;
  State state_ = State::kFree;
  RequestPort::Resolved target_;
  IoRequest io_{};
  RangeLock::Entry order_{};
  bool holds_order_ = false;
  bool kicked_ = false;      // the current state's operation was started
  bool pending_ = false;     // ... and its callback has not come yet
  bool cancelled_ = false;
  bool data_ok_ = true;      // the payload arrived
  bool reply_due_ = true;    // a reply is owed (not after cancel)
  bool in_advance_ = false, again_ = false;
  std::uint32_t generation_ = 0;  // one per start()
};

}  // namespace ibdisk::target
