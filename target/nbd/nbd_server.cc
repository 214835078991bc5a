#include "target/nbd/nbd_server.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/log.h"
#include "target/nbd/block_status.h"
#include "target/nbd/handshake.h"
#include "target/nbd/protocol.h"
#include "target/nbd/stream.h"
#include "target/nbd/tls.h"
#include "target/request.h"
#include "transport/tcp/peer_cred.h"

namespace ibdisk::nbd {
namespace {

namespace asio = boost::asio;
using asio::ip::tcp;
using boost::system::error_code;

constexpr std::size_t kBufferAlign = 4096;            // O_DIRECT-capable when the I/O is aligned
constexpr std::size_t kKeepBuffer = 1u << 20;         // a slot keeps a buffer up to this between requests
constexpr std::size_t kDiscardChunk = 256u << 10;     // payload of a refused WRITE is read in these
constexpr std::size_t kMaxRepliesPerWrite = 32;       // replies gathered into one socket write

// The handshake's view of the registry; holds the connection's lease on its export.
class RegistryCatalog final : public ExportCatalog {
 public:
  explicit RegistryCatalog(target::ExportRegistry& r) : registry_(r) {}

  std::vector<std::string> names() const override {
    std::vector<std::string> out;
    for (const auto& e : registry_.list()) out.push_back(e.name);
    return out;
  }

  // Every export is refused with this message (a local user the server does not serve).
  void refuse_all(std::string why) { refusal_ = std::move(why); }

  CatalogAnswer probe(std::string_view name) override {
    CatalogAnswer a;
    target::ExportInfo info;
    if (!lookup(name, &info, &a)) return a;
    if (!refusal_.empty()) {
      a.refusal = Refusal::kPolicy;
      a.message = refusal_;
      return a;
    }
    if (!info.read_only && !info.shared && info.writers > 0) {
      a.refusal = Refusal::kPolicy;
      a.message = busy_message(info.name);
    }
    return a;
  }

  CatalogAnswer open(std::string_view name) override {
    CatalogAnswer a;
    target::ExportInfo info;
    if (!lookup(name, &info, &a)) return a;
    if (!refusal_.empty()) {
      a.refusal = Refusal::kPolicy;
      a.message = refusal_;
      return a;
    }
    // NBD cannot say whether a client means to write: every client of a writable export is
    // its writer, so an exclusive export has one NBD client at a time.
    auto r = registry_.open(info.name, !info.read_only);
    if (!r.lease) {
      a.refusal = r.error == target::OpenError::kUnknownExport ? Refusal::kUnknown : Refusal::kPolicy;
      a.message = r.error == target::OpenError::kBusy ? busy_message(info.name) : r.message;
      return a;
    }
    lease_ = std::move(r.lease);
    return a;
  }

  target::ExportLease* lease() const { return lease_.get(); }
  void release() { lease_.reset(); }

 private:
  bool lookup(std::string_view name, target::ExportInfo* info, CatalogAnswer* a) const {
    if (!registry_.find(std::string(name), info)) {
      std::string names;
      for (const auto& n : this->names()) names += (names.empty() ? "" : ", ") + n;
      a->refusal = Refusal::kUnknown;
      a->message = "no export named '" + std::string(name) + "' (this target exports: " +
                   (names.empty() ? "nothing" : names) + ")";
      return false;
    }
    a->facts = {info->name, info->size, info->block_size, info->read_only, info->shared, info->trim};
    return true;
  }
  static std::string busy_message(const std::string& name) {
    // Short: nbd-client shows only the first 95 bytes.
    return "export '" + name + "' already has a writer (exclusive; serve it ,shared or ,ro for more clients)";
  }

  target::ExportRegistry& registry_;
  std::unique_ptr<target::ExportLease> lease_;
  std::string refusal_;
};

class Connection;

struct FreeDeleter {
  void operator()(std::byte* p) const { std::free(p); }
};

// One NBD request on the target's request path: its target::Request, the NBD header, its
// buffer and its reply. Made once per connection (max_in_flight of them).
struct Op {
  target::Request req;
  Request nbd;
  std::unique_ptr<std::byte[], FreeDeleter> buf;
  std::size_t capacity = 0;
  std::size_t accounted = 0;  // bytes counted in the connection's buffered total
  std::uint32_t error = 0;    // an NBD error found before the request path (check_request)
  const char* message = nullptr;
  std::uint32_t descriptors = 0;  // a block status reply's, in buf
  // The reply: a header kept here, then an optional tail (read data or error message).
  std::array<std::byte, 32> head{};
  std::size_t head_len = 0;
  const void* tail = nullptr;
  std::size_t tail_len = 0;

  bool ensure(std::size_t n) {
    if (capacity >= n) return true;
    buf.reset();
    capacity = 0;
    const std::size_t want = (n + kBufferAlign - 1) / kBufferAlign * kBufferAlign;
    auto* p = static_cast<std::byte*>(std::aligned_alloc(kBufferAlign, want));
    if (!p) return false;
    buf.reset(p);
    capacity = want;
    return true;
  }
  template <typename Wire>
  void set_head(const Wire& w) {
    static_assert(sizeof(Wire) <= sizeof(head));
    std::memcpy(head.data(), &w, sizeof(Wire));
    head_len = sizeof(Wire);
  }
};

}  // namespace

struct detail::NbdServerState : std::enable_shared_from_this<detail::NbdServerState> {
  NbdServerState(asio::io_context& io_, target::ExportRegistry& reg, target::StorageEngine& eng,
        target::NetworkAllowList a, NbdServerOptions o)
      : io(io_), registry(reg), engine(eng), allow(std::move(a)), opts(o), acceptor(io_), log(logger("nbd")) {}

  void accept();
  void shutdown();
  // Why a loopback peer gets no export (another local user), or empty.
  std::string local_user_refusal(const tcp::socket& s, const tcp::endpoint& peer) const;

  asio::io_context& io;
  target::ExportRegistry& registry;
  target::StorageEngine& engine;
  target::NetworkAllowList allow;
  NbdServerOptions opts;
  tcp::acceptor acceptor;
  std::shared_ptr<spdlog::logger> log;
  std::set<Connection*> connections;
  std::uint16_t port = 0;
  bool stopped = false;
};

namespace {

// One NBD client. The handshake is its own small state machine (handshake.h); in transmission
// every request goes through the target's request path (target/request.h) with this
// connection as its RequestPort: it reads a write's payload when the request asks for it and
// sends each reply as the request gets to DATA_OUT.
class Connection : public std::enable_shared_from_this<Connection>, public target::RequestPort {
 public:
  Connection(std::shared_ptr<detail::NbdServerState> server, tcp::socket socket, std::string peer)
      : server_(std::move(server)),
        log_(server_->log),
        stream_(std::move(socket)),
        timer_(server_->io),
        peer_(std::move(peer)),
        catalog_(server_->registry),
        handshake_(catalog_, server_->opts.tls ? TlsMode::kRequired : TlsMode::kOff) {
    server_->connections.insert(this);
  }
  ~Connection() {
    server_->connections.erase(this);
    log_->debug("{}: connection released", peer_);
  }

  void refuse_all(std::string why) { catalog_.refuse_all(std::move(why)); }

  void start() {
    timer_.expires_after(std::chrono::seconds(server_->opts.handshake_timeout_s));
    timer_.async_wait([self = shared_from_this()](const error_code& ec) {
      if (!ec && !self->transmitting_) {
        self->close(spdlog::level::warn, "handshake not finished within " +
                                             std::to_string(self->server_->opts.handshake_timeout_s) + " s");
      }
    });
    const GreetingWire g = make_greeting();
    const auto bytes = bytes_of(g);
    out_.assign(bytes.begin(), bytes.end());
    asio::async_write(stream_, asio::buffer(out_), [self = shared_from_this()](const error_code& ec, std::size_t) {
      if (self->failed(ec, "sending the greeting")) return;
      self->read_client_flags();
    });
  }

  // Ends the connection now: requests not yet at the storage engine end; those at it complete,
  // unanswered, and the export is released once the last one has.
  void close(spdlog::level::level_enum level, const std::string& why) {
    if (closed_) return;
    closed_ = true;
    log_->log(level, "{}: {}; closing the connection", peer_, why);
    error_code ec;
    timer_.cancel();
    stream_.socket().shutdown(tcp::socket::shutdown_both, ec);
    stream_.socket().close(ec);
    // Replies queued but not yet in a write will never go out.
    for (Op* op : std::exchange(replies_, {})) op->req.reply_sent(-ECONNRESET);
    for (auto& op : ops_) {
      if (op.req.busy()) op.req.cancel();
    }
    release_export_if_idle();
    if (busy_ == 0) let_go();
  }

  // --- target::RequestPort -----------------------------------------------------------------
  Resolved resolve(target::Request& req) override {
    Resolved r;
    Op& op = of(req);
    if (op.error != 0) {
      r.verdict = Verdict::kError;
      req.status = -EINVAL;  // the reply carries op.error
      return r;
    }
    if (op.nbd.type == kCmdCache) {
      prefetch(op.nbd.offset, op.nbd.length);
      r.verdict = Verdict::kDone;
      return r;
    }
    r.file = file_;
    r.writable = catalog_.lease()->writable();
    return r;
  }

  bool acquire_slot(target::Request& req) override {
    Op& op = of(req);
    const std::size_t need = req.buffer_bytes();
    // A connection holds at most max_buffered bytes of payload; one request always fits.
    if ((buffered_ > 0 && buffered_ + need > server_->opts.max_buffered) || !waiting_.empty()) {
      waiting_.push_back(&req);
      return false;
    }
    return give(op, need);
  }

  void release_slot(target::Request& req) override {
    Op& op = of(req);
    if (req.slot.data == nullptr) {
      const auto it = std::find(waiting_.begin(), waiting_.end(), &req);
      if (it != waiting_.end()) waiting_.erase(it);
      return;
    }
    buffered_ -= op.accounted;
    op.accounted = 0;
    req.slot = {};
    if (op.capacity > kKeepBuffer) {
      op.buf.reset();
      op.capacity = 0;
    }
    while (!waiting_.empty()) {
      target::Request* next = waiting_.front();
      const std::size_t need = next->buffer_bytes();
      if (buffered_ > 0 && buffered_ + need > server_->opts.max_buffered) break;
      waiting_.pop_front();
      if (!give(of(*next), need)) {
        of(*next).error = kEnomem;  // answered as an error once it runs
        of(*next).message = "the server could not allocate the request's buffer";
      }
      asio::post(server_->io, [next, gen = next->generation()] { next->slot_ready(gen); });
    }
  }

  void receive_data(target::Request& req) override {
    Op& op = of(req);
    const std::uint32_t len = request_payload(op.nbd);
    if (closed_) return req.data_received(-ECONNRESET);
    if (req.slot.data == nullptr) return discard_payload(req, len);
    asio::async_read(stream_, asio::buffer(req.slot.data, len),
                     [self = shared_from_this(), &req](const error_code& ec, std::size_t) {
                       if (self->failed(ec, "reading a write payload")) return req.data_received(-ECONNRESET);
                       self->payload_done();
                       req.data_received(0);
                     });
  }

  void send_reply(target::Request& req) override {
    Op& op = of(req);
    if (closed_) return req.reply_sent(-ECONNRESET);
    if (req.status < 0 && op.error == 0) {
      // check_request caught everything NBD says is the client's fault: this is the storage's.
      op.error = wire_error_from_errno(req.status);
      op.message = strerrordesc_np(-req.status);
      log_->warn("{}: {} at offset {} length {} on '{}' failed: {}", peer_, command_name(op.nbd.type), op.nbd.offset,
                 op.nbd.length, file_->path, op.message);
    }
    if (op.error == 0 && op.nbd.type == kCmdBlockStatus) {
      const std::uint32_t most = (op.nbd.flags & kCmdFlagReqOne) ? 1 : wire::kMaxExtents;
      op.descriptors = encode_block_status(req.slot.data, req.reply_length, op.nbd.length, most);
      if (op.descriptors == 0) {
        op.error = kEio;
        op.message = "the target's extent list was malformed";
      }
    }
    build_reply(op);
    replies_.push_back(&op);
    send_replies();
  }

  void request_done(target::Request& req) override {
    Op& op = of(req);
    op.error = 0;
    op.message = nullptr;
    free_.push_back(&op);
    if (--busy_ == 0) {
      end_if_disconnected();
      release_export_if_idle();
      if (closed_) let_go();  // nothing of ours is at the engine any more
    }
    if (paused_ && !closed_) {
      paused_ = false;
      read_request();
    }
  }

  // NBD_CMD_CACHE: where reads go through the page cache, start reading the range into it
  // (readahead, not waited for); reads of an O_DIRECT export would not use it. A hint: at most
  // kMaxPayload bytes per command, so the io thread never queues a huge readahead at once.
  void prefetch(std::uint64_t offset, std::uint32_t length) {
    if (file_->mixed_paths()) return;
    const int rc = ::posix_fadvise(file_->fd, static_cast<off_t>(offset),
                                   static_cast<off_t>(std::min(length, kMaxPayload)), POSIX_FADV_WILLNEED);
    if (rc != 0) log_->debug("{}: NBD_CMD_CACHE on '{}': posix_fadvise: {}", peer_, file_->path, strerrordesc_np(rc));
  }

  target::StorageEngine& engine() override { return server_->engine; }
  asio::io_context& io() override { return server_->io; }

 private:
  // --- handshake ---------------------------------------------------------------------------
  // Once closed and with nothing at the storage engine, the export is free for the next
  // client, even while handlers of this connection still wait in the io_context.
  void release_export_if_idle() {
    if (closed_ && busy_ == 0) catalog_.release();
  }

  // true when the connection is closed: the operation failed (and closed it), or close() ran
  // first. An operation that completed before close() still reports success to its handler,
  // which runs after it (stop() posted while the handler was queued): it must not go on, as
  // the export's lease may already be released.
  bool failed(const error_code& ec, const char* what) {
    if (closed_) return true;
    if (!ec) return false;
    if (ec == asio::error::eof) {
      close(spdlog::level::info, std::string("client closed the connection while ") + what);
    } else {
      close(spdlog::level::warn, std::string(what) + " failed: " + ec.message());
    }
    return true;
  }

  void read_client_flags() {
    asio::async_read(stream_, asio::buffer(in_.data(), 4), [self = shared_from_this()](const error_code& ec, std::size_t) {
      if (self->failed(ec, "reading the client flags")) return;
      if (self->handshake_.on_client_flags({self->in_.data(), 4}) != Handshake::Next::kOption) {
        self->close(spdlog::level::warn, self->handshake_.reason());
        return;
      }
      self->read_option_header();
    });
  }

  void read_option_header() {
    asio::async_read(stream_, asio::buffer(in_.data(), sizeof(OptionHeaderWire)),
                     [self = shared_from_this()](const error_code& ec, std::size_t) {
                       if (self->failed(ec, "reading an option")) return;
                       self->on_option_header();
                     });
  }

  void on_option_header() {
    OptionHeader h;
    const Parse p = parse_option_header({in_.data(), sizeof(OptionHeaderWire)}, &h);
    if (p == Parse::kTooLarge) {
      close(spdlog::level::warn, "option " + std::to_string(h.option) + " has " + std::to_string(h.length) +
                                     " bytes of data, more than the " + std::to_string(kMaxOptionLength) +
                                     " this server accepts");
      return;
    }
    if (p != Parse::kOk) {
      close(spdlog::level::warn, std::string("option header: ") + to_string(p) + " (not an NBD client, or out of step)");
      return;
    }
    option_ = h.option;
    option_data_.resize(h.length);
    if (h.length == 0) return on_option();
    asio::async_read(stream_, asio::buffer(option_data_), [self = shared_from_this()](const error_code& ec, std::size_t) {
      if (self->failed(ec, "reading option data")) return;
      self->on_option();
    });
  }

  void on_option() {
    out_.clear();
    const Handshake::Next next = handshake_.on_option(option_, option_data_, out_);
    if (const std::uint32_t err = handshake_.last_error()) {
      const bool refusal = err == kRepErrPolicy || err == kRepErrUnknown;
      log_->log(refusal ? spdlog::level::warn : spdlog::level::debug, "{}: option {} ({}) refused: {}", peer_,
                option_name(option_), option_, handshake_.reason());
    }
    if (next == Handshake::Next::kClose && out_.empty()) {
      close(spdlog::level::warn, handshake_.reason());
      return;
    }
    asio::async_write(stream_, asio::buffer(out_), [self = shared_from_this(), next](const error_code& ec, std::size_t) {
      if (self->failed(ec, "sending an option reply")) return;
      switch (next) {
        case Handshake::Next::kOption: return self->read_option_header();
        case Handshake::Next::kTransmission: return self->begin_transmission();
        case Handshake::Next::kClose: return self->close(spdlog::level::info, self->handshake_.reason());
        case Handshake::Next::kStartTls: return self->start_tls();
      }
    });
  }

  // NBD_OPT_STARTTLS was acknowledged: the TLS handshake (within the handshake timeout), then
  // the options go on inside TLS.
  void start_tls() {
    NbdTls& tls = *server_->opts.tls;
    auto& stream = stream_.start_tls(tls.context());
    tls_handle_ = stream.native_handle();
    psk_.watch(stream.native_handle());
    stream.async_handshake(asio::ssl::stream_base::server, [self = shared_from_this()](const error_code& ec) {
          if (self->failed_tls(ec)) return;
          self->handshake_.tls_established();
          SSL* ssl = self->stream_tls_handle();
          const int group = SSL_get_negotiated_group(ssl);
          self->log_->info("{}: TLS established ({}, {}, {}, {})", self->peer_, SSL_get_version(ssl),
                           SSL_get_cipher_name(ssl), group != 0 ? std::string("key exchange ") + OBJ_nid2sn(group & ~TLSEXT_nid_unknown)
                                                                : std::string("no key exchange: PSK only"),
                           self->psk_.who(ssl));
          self->read_option_header();
        });
  }

  bool failed_tls(const error_code& ec) {
    if (closed_) return true;
    if (!ec) return false;
    close(spdlog::level::warn, "TLS handshake failed: " + psk_.failure(ec.message(), *server_->opts.tls));
    return true;
  }

  // --- transmission ------------------------------------------------------------------------
  static Op& of(target::Request& req) { return *static_cast<Op*>(req.port_data); }

  // Drops the requests' hold on this connection, after the current handler: whoever called
  // may still be inside one of its requests.
  void let_go() {
    if (self_) asio::post(server_->io, [hold = std::move(self_)] {});
  }

  bool give(Op& op, std::size_t need) {
    if (!op.ensure(need)) return false;
    op.accounted = need;
    buffered_ += need;
    op.req.slot = transport::Slot{op.buf.get(), static_cast<std::uint32_t>(op.capacity), -1};
    return true;
  }

  void begin_transmission() {
    transmitting_ = true;
    timer_.cancel();
    const Transmission& t = handshake_.transmission();
    file_ = &catalog_.lease()->file();
    limits_.size = t.facts.size;
    limits_.transmission_flags = t.flags;
    limits_.max_payload = kMaxPayload;
    limits_.block_status = t.block_status;
    structured_ = t.structured;
    ops_ = std::vector<Op>(std::max(1u, server_->opts.max_in_flight));
    free_.reserve(ops_.size());
    for (auto& op : ops_) {
      op.req.port_data = &op;
      free_.push_back(&op);
    }
    gather_.reserve(2 * kMaxRepliesPerWrite);
    batch_.reserve(kMaxRepliesPerWrite);
    log_->info("{}: export '{}' opened ({}, {} bytes, {} replies)", peer_, t.facts.name,
               catalog_.lease()->writable() ? "writer" : "reader", t.facts.size,
               structured_ ? "structured" : "simple");
    read_request();
  }

  void read_request() {
    if (closed_ || disconnecting_ || awaiting_payload_) return;
    if (free_.empty()) {
      paused_ = true;  // resumed when a request is done
      return;
    }
    asio::async_read(stream_, asio::buffer(in_.data(), sizeof(RequestWire)),
                     [self = shared_from_this()](const error_code& ec, std::size_t n) { self->on_request(ec, n); });
  }

  static wire::Opcode opcode_of(std::uint16_t type) {
    switch (type) {
      case kCmdRead: return wire::Opcode::kRead;
      case kCmdWrite: return wire::Opcode::kWrite;
      case kCmdFlush: return wire::Opcode::kFlush;
      case kCmdTrim: return wire::Opcode::kTrim;
      case kCmdBlockStatus: return wire::Opcode::kExtents;
      case kCmdCache: return wire::Opcode::kRead;  // answered in resolve() (kDone); harmless if not
      default: return wire::Opcode::kWriteZeroes;
    }
  }

  void on_request(const error_code& ec, std::size_t n) {
    if (closed_) return;  // a header read before close() must not reach the engine: see failed()
    if (ec) {
      if (ec == asio::error::eof && n == 0) {
        close(spdlog::level::info, "client closed the connection without NBD_CMD_DISC");
      } else {
        close(spdlog::level::warn, "reading a request failed (truncated or lost): " + ec.message());
      }
      return;
    }
    Request r;
    if (parse_request({in_.data(), sizeof(RequestWire)}, &r) != Parse::kOk) {
      close(spdlog::level::warn, "request with a wrong magic number (not NBD, or the stream is out of step)");
      return;
    }
    const nbd::Verdict v = check_request(r, limits_);
    if (v.error == 0 && r.type == kCmdDisc) {
      disconnecting_ = true;
      end_if_disconnected();
      return;
    }
    Op* op = free_.back();
    free_.pop_back();
    op->nbd = r;
    op->error = v.error;
    op->message = v.message;
    if (v.error != 0) {
      log_->debug("{}: {} ({}) offset {} length {} refused: {}", peer_, command_name(r.type), r.type, r.offset,
                  r.length, v.message);
    }
    wire::Command cmd;
    cmd.opcode = opcode_of(r.type);
    cmd.flags = (r.flags & kCmdFlagFua) ? wire::kFlagFua : 0;
    if (r.type == kCmdWriteZeroes && !(r.flags & kCmdFlagNoHole)) cmd.flags |= wire::kFlagMayTrim;
    cmd.offset = r.offset;
    cmd.length = r.length;
    cmd.tag = r.cookie;
    // A write's payload is next on the wire: read no further header until the request took it.
    awaiting_payload_ = request_payload(r) > 0;
    if (busy_++ == 0) self_ = shared_from_this();  // requests hold the connection
    op->req.start(*this, cmd);
    read_request();
  }

  void payload_done() {
    awaiting_payload_ = false;
    read_request();
  }

  // A refused WRITE's payload still follows on the wire: read it past, then answer.
  void discard_payload(target::Request& req, std::uint32_t remaining) {
    if (remaining == 0) {
      payload_done();
      return req.data_received(0);
    }
    const std::size_t chunk = std::min<std::size_t>(remaining, kDiscardChunk);
    discard_.resize(std::max(discard_.size(), chunk));
    asio::async_read(stream_, asio::buffer(discard_.data(), chunk),
                     [self = shared_from_this(), &req, remaining, chunk](const error_code& ec, std::size_t) {
                       if (self->failed(ec, "reading a refused write's payload")) return req.data_received(-ECONNRESET);
                       self->discard_payload(req, static_cast<std::uint32_t>(remaining - chunk));
                     });
  }

  void build_reply(Op& op) {
    const Request& r = op.nbd;
    op.tail = nullptr;
    op.tail_len = 0;
    if (structured_) {
      if (op.error != 0) {
        const std::size_t len = op.message ? std::min(std::strlen(op.message), kMaxStringLength) : 0;
        op.set_head(make_error_chunk(r.cookie, op.error, static_cast<std::uint16_t>(len)));
        op.tail = op.message;
        op.tail_len = len;
      } else if (r.type == kCmdRead) {
        op.set_head(make_read_chunk(r.cookie, r.offset, r.length));
        op.tail = op.req.slot.data;
        op.tail_len = r.length;
      } else if (r.type == kCmdBlockStatus) {
        op.set_head(make_block_status_chunk(r.cookie, kBaseAllocationId, op.descriptors));
        op.tail = op.req.slot.data;
        op.tail_len = op.descriptors * sizeof(BlockDescriptorWire);
      } else {
        op.set_head(make_chunk(kReplyFlagDone, kReplyNone, r.cookie, 0));
      }
    } else {
      op.set_head(make_simple_reply(r.cookie, op.error));
      if (op.error == 0 && r.type == kCmdRead) {
        op.tail = op.req.slot.data;
        op.tail_len = r.length;
      }
    }
  }

  void send_replies() {
    if (writing_ || closed_ || replies_.empty()) return;
    writing_ = true;
    gather_.clear();
    batch_.clear();
    while (!replies_.empty() && batch_.size() < kMaxRepliesPerWrite) {
      Op* op = replies_.front();
      replies_.pop_front();
      batch_.push_back(op);
      gather_.emplace_back(op->head.data(), op->head_len);
      if (op->tail_len > 0) gather_.emplace_back(op->tail, op->tail_len);
    }
    asio::async_write(stream_, gather_, [self = shared_from_this()](const error_code& ec, std::size_t) {
      self->writing_ = false;
      const bool bad = self->failed(ec, "sending replies");
      std::vector<Op*> done = std::exchange(self->batch_, {});
      self->batch_.reserve(kMaxRepliesPerWrite);
      for (Op* op : done) op->req.reply_sent(bad ? -ECONNRESET : 0);
      if (bad) return;
      self->send_replies();
      self->end_if_disconnected();
    });
  }

  // After NBD_CMD_DISC: close once every earlier request is answered.
  void end_if_disconnected() {
    if (!disconnecting_ || closed_ || busy_ > 0 || writing_ || !replies_.empty()) return;
    close(spdlog::level::info, "client disconnected (NBD_CMD_DISC)");
  }

  std::shared_ptr<detail::NbdServerState> server_;
  std::shared_ptr<spdlog::logger> log_;
  Stream stream_;
  PskAttempt psk_;  // what the TLS handshake showed of the client's key
  SSL* tls_handle_ = nullptr;
  SSL* stream_tls_handle() const { return tls_handle_; }
  asio::steady_timer timer_;
  std::string peer_;
  RegistryCatalog catalog_;  // before handshake_, which refers to it
  Handshake handshake_;
  bool closed_ = false;
  bool transmitting_ = false;

  // Handshake.
  std::array<std::byte, 32> in_{};  // client flags, option headers, request headers
  std::uint32_t option_ = 0;
  std::vector<std::byte> option_data_;
  std::vector<std::byte> out_;

  // Transmission: all owned by the io thread.
  target::BackingFile* file_ = nullptr;
  ExportLimits limits_;
  bool structured_ = false;
  std::vector<Op> ops_;  // sized once; Op* stay valid
  std::vector<Op*> free_;
  std::deque<target::Request*> waiting_;  // for buffer room, in order
  std::deque<Op*> replies_;               // answered, waiting for the socket
  std::vector<Op*> batch_;                // being written
  std::vector<asio::const_buffer> gather_;
  std::vector<std::byte> discard_;
  std::size_t buffered_ = 0;
  unsigned busy_ = 0;                     // requests not FREE
  std::shared_ptr<Connection> self_;      // while busy_ > 0
  bool writing_ = false;
  bool paused_ = false;
  bool awaiting_payload_ = false;
  bool disconnecting_ = false;
};

std::string endpoint_text(const tcp::endpoint& ep) {
  const auto a = ep.address();
  return (a.is_v6() ? "[" + a.to_string() + "]" : a.to_string()) + ":" + std::to_string(ep.port());
}

}  // namespace

void detail::NbdServerState::accept() {
  acceptor.async_accept([self = shared_from_this()](const error_code& ec, tcp::socket socket) {
    if (self->stopped || ec == asio::error::operation_aborted) return;
    if (ec) {
      self->log->warn("accepting an NBD connection failed: {}", ec.message());
      return self->accept();
    }
    error_code ep_ec;
    const tcp::endpoint peer = socket.remote_endpoint(ep_ec);
    if (ep_ec) return self->accept();  // already gone
    if (!self->allow.allows(peer.address())) {
      self->log->warn("refused NBD connection from {}: not in the allowed networks ({}); add its network with --allow",
                      endpoint_text(peer), self->allow.describe());
      socket.close(ep_ec);
      return self->accept();
    }
    socket.set_option(tcp::no_delay(true), ep_ec);
    self->log->debug("{}: connected", endpoint_text(peer));
    std::string refusal;
    // With TLS the key is the proof; without it, a local peer must be our user or root.
    if (!self->opts.any_local_user && !self->opts.tls) refusal = self->local_user_refusal(socket, peer);
    auto conn = std::make_shared<Connection>(self, std::move(socket), endpoint_text(peer));
    if (!refusal.empty()) {
      self->log->warn("{}: every export refused: {}", endpoint_text(peer), refusal);
      conn->refuse_all(refusal);  // answered in the handshake, so the client can say why
    }
    conn->start();
    self->accept();
  });
}

std::string detail::NbdServerState::local_user_refusal(const tcp::socket& s, const tcp::endpoint& peer) const {
  auto a = peer.address();
  if (a.is_v6() && a.to_v6().is_v4_mapped()) a = asio::ip::make_address_v4(asio::ip::v4_mapped, a.to_v6());
  if (!a.is_loopback()) return {};
  error_code ec;
  const auto local = s.local_endpoint(ec);
  const auto uid = ec ? std::nullopt : transport::loopback_peer_uid(local, peer);
  const uid_t own = ::geteuid();
  if (uid && (*uid == 0 || *uid == own)) return {};
  // Short: nbd-client shows only the first 95 bytes.
  return uid ? "NBD here serves uid " + std::to_string(own) + " and root only, not uid " + std::to_string(*uid)
             : std::string("NBD here serves this host's uid ") + std::to_string(own) + " and root only";
}

void detail::NbdServerState::shutdown() {
  if (stopped) return;
  stopped = true;
  error_code ec;
  acceptor.close(ec);
  std::vector<std::shared_ptr<Connection>> live;
  for (Connection* c : connections) {
    if (auto sp = c->weak_from_this().lock()) live.push_back(std::move(sp));
  }
  for (auto& c : live) c->close(spdlog::level::info, "the server is stopping");
}

NbdServer::NbdServer(asio::io_context& io, target::ExportRegistry& exports, target::StorageEngine& engine,
                     target::NetworkAllowList allow, tcp::endpoint listen, NbdServerOptions opts)
    : state_(std::make_shared<detail::NbdServerState>(io, exports, engine, std::move(allow), opts)) {
  auto& a = state_->acceptor;
  error_code ec;
  const std::string where = "NBD listener on " + endpoint_text(listen);
  if (a.open(listen.protocol(), ec)) throw SystemError(where, ec.value(), "");
  a.set_option(tcp::acceptor::reuse_address(true), ec);
  if (a.bind(listen, ec)) {
    throw SystemError("bind(" + where + ")", ec.value(),
                      ec == asio::error::address_in_use
                          ? "another process listens on that port (see `ss -ltnp`): stop it or choose another NBD port"
                          : "is the address configured on this host? (`ip -br addr`)");
  }
  if (a.listen(asio::socket_base::max_listen_connections, ec)) throw SystemError("listen(" + where + ")", ec.value(), "");
  state_->port = a.local_endpoint().port();
  state_->log->info("NBD front end listening on {} (allowed networks: {}; {})", endpoint_text(a.local_endpoint()),
                    state_->allow.describe(), opts.tls ? opts.tls->description() : std::string("no TLS"));
  state_->accept();
}

NbdServer::~NbdServer() { state_->shutdown(); }

std::uint16_t NbdServer::port() const { return state_->port; }

void NbdServer::stop() {
  asio::post(state_->io, [s = state_] { s->shutdown(); });
}

std::size_t NbdServer::connections() const { return state_->connections.size(); }

}  // namespace ibdisk::nbd
