#include "target/request.h"

namespace ibdisk::target {

const char* Request::name(State s) {
  switch (s) {
    case State::kFree: return "FREE";
    case State::kNew: return "NEW";
    case State::kNeedSlot: return "NEED_SLOT";
    case State::kDataIn: return "DATA_IN";
    case State::kWaitOrder: return "WAIT_ORDER";
    case State::kExecuting: return "EXECUTING";
    case State::kDataOut: return "DATA_OUT";
    case State::kCompleting: return "COMPLETING";
  }
  return "?";
}

void Request::start(RequestPort& port, const wire::Command& c) {
  port_ = &port;
  ++generation_;
  cmd = c;
  slot = {};
  status = 0;
  reply_length = 0;
  target_ = {};
  io_ = IoRequest{};
  order_ = RangeLock::Entry{};
  holds_order_ = false;
  kicked_ = pending_ = cancelled_ = false;
  data_ok_ = reply_due_ = true;
  state_ = State::kNew;
  advance();
}

// Runs steps until the state stops changing, as SPDK's nvmf_rdma_request_process does. A
// callback that arrives while a step runs (a transport that answers at once) only marks the
// loop to go round again, so steps never nest.
void Request::advance() {
  if (in_advance_) {
    again_ = true;
    return;
  }
  in_advance_ = true;
  do {
    again_ = false;
    State before;
    do {
      before = state_;
      step();
    } while (state_ != before);
  } while (again_);
  in_advance_ = false;
  if (state_ == State::kFree) port_->request_done(*this);  // may start() it again at once
}

void Request::go(State s) {
  state_ = s;
  kicked_ = pending_ = false;
}

template <class Kick>
bool Request::once(Kick kick) {
  if (!kicked_) {
    kicked_ = pending_ = true;
    kick();
  }
  return !pending_;
}

void Request::step() {
  switch (state_) {
    case State::kFree:
      return;
    case State::kNew:
      return on_new();
    case State::kNeedSlot:
      if (cancelled_) return go(State::kCompleting);
      if (!kicked_) {
        kicked_ = true;
        pending_ = !port_->acquire_slot(*this);
      }
      if (pending_) return;
      return go(cmd.opcode == wire::Opcode::kWrite ? State::kDataIn : State::kWaitOrder);
    case State::kDataIn:
      if (!once([this] { port_->receive_data(*this); })) return;
      if (!data_ok_ || cancelled_) {
        reply_due_ = false;  // the connection is gone: nobody to answer
        return go(State::kCompleting);
      }
      return go(status != 0 ? State::kDataOut : State::kWaitOrder);  // an early error skipped the payload
    case State::kWaitOrder:
      return on_wait_order();
    case State::kExecuting:
      return on_executing();
    case State::kDataOut:
      if (!reply_due_ || cancelled_) return go(State::kCompleting);
      if (!once([this] { port_->send_reply(*this); })) return;
      return go(State::kCompleting);
    case State::kCompleting:
      if (holds_order_) {
        target_.file->order.release(order_);
        holds_order_ = false;
      }
      if (slot.data != nullptr) port_->release_slot(*this);
      slot = {};
      target_ = {};
      return go(State::kFree);
  }
}

void Request::on_new() {
  // Answered at once, with no export and no storage: it only says the target runs.
  if (cmd.opcode == wire::Opcode::kHeartbeat) return go(State::kDataOut);
  target_ = port_->resolve(*this);
  if (target_.verdict == RequestPort::Verdict::kFatal) {
    reply_due_ = false;
    return go(State::kCompleting);
  }
  if (target_.verdict == RequestPort::Verdict::kDone) return go(State::kDataOut);
  if (target_.verdict == RequestPort::Verdict::kOk) {
    const BackingFile& f = *target_.file;
    if (cmd.opcode != wire::Opcode::kFlush && !wire::in_range(cmd.offset, cmd.length, f.size)) {
      status = -EINVAL;
    } else if (cmd.opcode != wire::Opcode::kRead && cmd.opcode != wire::Opcode::kFlush &&
               cmd.opcode != wire::Opcode::kExtents && !target_.writable) {
      status = -EROFS;
    }
  } else if (status == 0) {
    status = -EIO;
  }
  if (status != 0) {
    // Answer the error; a write's payload is still on its way and must be skipped first.
    return go(cmd.opcode == wire::Opcode::kWrite ? State::kDataIn : State::kDataOut);
  }
  // IoOp's values are the wire opcodes of the commands that reach the storage.
  static_assert(static_cast<int>(IoOp::kWriteZeroes) == static_cast<int>(wire::Opcode::kWriteZeroes) &&
                static_cast<int>(IoOp::kExtents) == static_cast<int>(wire::Opcode::kExtents));
  io_.op = static_cast<IoOp>(cmd.opcode);
  io_.flags = ((cmd.flags & wire::kFlagFua) ? kIoFua : 0) |
              ((cmd.flags & wire::kFlagMayTrim) && cmd.opcode == wire::Opcode::kWriteZeroes ? kIoMayTrim : 0);
  io_.offset = cmd.offset;
  io_.length = cmd.length;
  io_.done = &Request::storage_done;
  io_.context = this;
  go(has_data() ? State::kNeedSlot : State::kWaitOrder);
}

void Request::on_wait_order() {
  if (!kicked_) {
    if (cancelled_) return go(State::kCompleting);
    BackingFile& f = *target_.file;
    if (!f.mixed_paths()) return go(State::kExecuting);  // one path only: nothing to order
    kicked_ = true;
    io_.data = slot.data;
    order_.mode = order_mode(f, io_);
    RangeLock::set_range(order_, cmd.offset, cmd.opcode == wire::Opcode::kFlush ? 0 : cmd.length);
    order_.io = &port_->io();
    order_.wake = &Request::order_granted;
    order_.ctx = this;
    if (cmd.opcode == wire::Opcode::kFlush) return go(State::kExecuting);  // fdatasync orders itself
    pending_ = !f.order.acquire(order_);
    holds_order_ = !pending_;
    if (pending_) return;
  }
  if (pending_) return;
  if (cancelled_) return go(State::kCompleting);
  go(State::kExecuting);
}

void Request::order_granted(void* self) {
  auto* r = static_cast<Request*>(self);
  r->holds_order_ = true;
  r->pending_ = false;
  r->advance();
}

void Request::on_executing() {
  if (!kicked_) {
    io_.data = slot.data;
    io_.fixed_index = slot.fixed_index;
  }
  if (!once([this] { port_->engine().submit(*target_.file, &io_); })) return;
  if (holds_order_) {
    target_.file->order.release(order_);
    holds_order_ = false;
  }
  if (cmd.opcode == wire::Opcode::kWrite && slot.data != nullptr) {
    port_->release_slot(*this);  // a write's data is on disk: its buffer can serve others already
    slot = {};
  }
  go(State::kDataOut);
}

void Request::storage_done(IoRequest* io, int result) {
  auto* r = static_cast<Request*>(io->context);
  r->status = result < 0 ? result : 0;
  // Bytes of reply payload in the slot: a read's data, an extent list's encoding (the result).
  r->reply_length = result < 0 ? 0
                    : r->cmd.opcode == wire::Opcode::kRead    ? r->cmd.length
                    : r->cmd.opcode == wire::Opcode::kExtents ? static_cast<std::uint32_t>(result)
                                                              : 0;
  r->pending_ = false;
  r->advance();
}

void Request::cancel() {
  if (state_ == State::kFree || state_ == State::kCompleting) return;
  cancelled_ = true;
  reply_due_ = false;
  if (pending_) {
    switch (state_) {
      case State::kNeedSlot:
        port_->release_slot(*this);  // out of the slot queue
        pending_ = false;
        break;
      case State::kWaitOrder:
        if (target_.file->order.cancel(order_)) pending_ = false;  // else its grant is on the way
        break;
      default:
        break;  // the transport or the engine calls back
    }
  }
  advance();
}

void Request::slot_ready(std::uint32_t generation) {
  if (generation != generation_ || state_ != State::kNeedSlot || !pending_) return;
  pending_ = false;
  advance();
}

void Request::data_received(int st) {
  data_ok_ = st == 0;
  pending_ = false;
  advance();
}

void Request::reply_sent(int /*status*/) {
  pending_ = false;
  advance();
}

}  // namespace ibdisk::target
