// RDMA half of the self-test. Protocol (all messages are SelftestMsg, sent with SEND):
//   client connects with SelftestConnect as private data
//   server -> client  kBuffers: where to RDMA WRITE, where to RDMA READ, SHA-256 of the latter
//   client            RDMA WRITE x iterations, RDMA READ x iterations, checks the read SHA
//   client -> server  kDone: SHA-256 of what it wrote
//   server -> client  kResult: status 0 if the written bytes' SHA matched
//   client disconnects
#include <arpa/inet.h>
#include <endian.h>
#include <ifaddrs.h>
#include <netdb.h>

#include <array>
#include <optional>
#include <utility>
#include <cstring>
#include <stdexcept>

#include "common/checksum.h"
#include "common/error.h"
#include "common/log.h"
#include "transport/selftest.h"

namespace ibdisk {
namespace {

using namespace std::chrono_literals;
using rdma::CmId;

constexpr std::uint32_t kMagic = 0x49424453;  // "IBDS"
constexpr std::uint16_t kVersion = 1;
constexpr unsigned kWindow = 8;  // RDMA operations in flight

struct SelftestConnect {  // RDMA CM private data, little-endian
  std::uint32_t magic;
  std::uint16_t version;
  std::uint16_t reserved;
  std::uint32_t size;
  std::uint32_t iterations;
};
static_assert(sizeof(SelftestConnect) == 16 && sizeof(SelftestConnect) <= 56);

enum class MsgType : std::uint16_t { kBuffers = 1, kDone = 2, kResult = 3 };

struct SelftestMsg {  // little-endian on the wire
  std::uint32_t magic;
  std::uint16_t version;
  std::uint16_t type;
  std::uint64_t write_addr;
  std::uint32_t write_rkey;
  std::uint32_t length;
  std::uint64_t read_addr;
  std::uint32_t read_rkey;
  std::int32_t status;
  std::array<std::uint8_t, 32> sha256;
};
static_assert(sizeof(SelftestMsg) == 72);

auto log() {
  static auto l = ibdisk::logger("selftest");
  return l;
}


sockaddr_storage resolve_ip(const std::string& host, std::uint16_t port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string service = std::to_string(port);
  if (const int rc = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &res); rc != 0) {
    throw SystemError("resolving '" + host + "'", std::string(gai_strerror(rc)));
  }
  sockaddr_storage ss{};
  std::memcpy(&ss, res->ai_addr, res->ai_addrlen);
  ::freeaddrinfo(res);
  return ss;
}

// Waits for one completion of the given opcode and checks its status.
ibv_wc wait_completion(rdma::CompletionQueue& cq, std::chrono::milliseconds timeout, const char* what) {
  ibv_wc wc{};
  if (cq.wait({&wc, 1}, timeout) == 0) {
    throw SystemError(what, "no completion within " + std::to_string(timeout.count()) + " ms",
                      "the peer stopped answering", ETIMEDOUT);
  }
  if (wc.status != IBV_WC_SUCCESS) {
    throw SystemError(what, std::string("work completion ") + ibv_wc_status_str(wc.status),
                      "the connection failed; check both ports with `ibdisk setup doctor`");
  }
  return wc;
}

// Per-connection resources, declared parent first so children are destroyed first.
struct Endpoint {
  CmId id;
  rdma::ProtectionDomain pd;
  rdma::CompletionQueue cq;
  rdma::QueuePair qp;
  rdma::RegisteredBuffer local;   // client: data to write; server: RDMA WRITE target
  rdma::RegisteredBuffer remote;  // client: RDMA READ target; server: RDMA READ source
  rdma::RegisteredBuffer msgs;    // [0]: receive slot, [1]: send slot

  Endpoint(CmId&& cm, std::size_t size, bool server)
      : id(std::move(cm)),
        pd(id.verbs()),
        cq(id.verbs(), 2 * kWindow + 4),
        qp(id, pd, cq, kWindow + 2, 2),
        local(pd, size, IBV_ACCESS_LOCAL_WRITE | (server ? IBV_ACCESS_REMOTE_WRITE : 0)),
        remote(pd, size, IBV_ACCESS_LOCAL_WRITE | (server ? IBV_ACCESS_REMOTE_READ : 0)),
        msgs(pd, 2 * sizeof(SelftestMsg), IBV_ACCESS_LOCAL_WRITE) {}

  std::optional<ibv_wc> early_recv_;

  SelftestMsg* recv_slot() { return reinterpret_cast<SelftestMsg*>(msgs.data()); }
  SelftestMsg* send_slot() { return reinterpret_cast<SelftestMsg*>(msgs.data()) + 1; }

  void post_recv() {
    ibv_sge sge{reinterpret_cast<std::uintptr_t>(recv_slot()), sizeof(SelftestMsg), msgs.mr().lkey()};
    ibv_recv_wr wr{};
    wr.wr_id = 1;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    if (const int rc = qp.post_recv(&wr); rc != 0) throw SystemError("ibv_post_recv", rc);
  }

  void send(const SelftestMsg& m, std::chrono::milliseconds timeout) {
    *send_slot() = m;
    ibv_sge sge{reinterpret_cast<std::uintptr_t>(send_slot()), sizeof(SelftestMsg), msgs.mr().lkey()};
    ibv_send_wr wr{};
    wr.wr_id = 2;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = IBV_WR_SEND;
    wr.send_flags = IBV_SEND_SIGNALED;
    if (const int rc = qp.post_send(&wr); rc != 0) throw SystemError("ibv_post_send(SEND)", rc);
    // The peer's next message may complete our RECV before our SEND's completion is polled
    // (small transfers are that fast): keep it for receive().
    for (;;) {
      const ibv_wc wc = wait_completion(cq, timeout, "SEND");
      if (wc.opcode == IBV_WC_SEND) return;
      if (wc.opcode != IBV_WC_RECV || early_recv_) {
        throw SystemError("SEND", "unexpected completion opcode " + std::to_string(wc.opcode));
      }
      early_recv_ = wc;
    }
  }

  SelftestMsg receive(MsgType expected, std::chrono::milliseconds timeout) {
    const ibv_wc wc = early_recv_ ? *std::exchange(early_recv_, std::nullopt) : wait_completion(cq, timeout, "RECV");
    if (wc.opcode != IBV_WC_RECV || wc.byte_len != sizeof(SelftestMsg)) {
      throw SystemError("RECV", "unexpected completion (opcode " + std::to_string(wc.opcode) + ", " +
                                    std::to_string(wc.byte_len) + " bytes)");
    }
    SelftestMsg m = *recv_slot();
    if (le32toh(m.magic) != kMagic || le16toh(m.version) != kVersion ||
        static_cast<MsgType>(le16toh(m.type)) != expected) {
      throw SystemError("RECV", "malformed self-test message", "is the peer an ibdisk selftest of the same version?");
    }
    return m;
  }
};

SelftestMsg make_msg(MsgType type) {
  SelftestMsg m{};
  m.magic = htole32(kMagic);
  m.version = htole16(kVersion);
  m.type = htole16(static_cast<std::uint16_t>(type));
  return m;
}

// Posts `iterations` one-sided operations with at most kWindow in flight, signalling each.
double run_one_sided(Endpoint& ep, ibv_wr_opcode op, rdma::RegisteredBuffer& buf, std::uint64_t raddr,
                     std::uint32_t rkey, unsigned iterations, std::chrono::milliseconds timeout) {
  const auto start = std::chrono::steady_clock::now();
  unsigned posted = 0, done = 0;
  const char* what = op == IBV_WR_RDMA_WRITE ? "RDMA WRITE" : "RDMA READ";
  while (done < iterations) {
    while (posted < iterations && posted - done < kWindow) {
      ibv_sge sge{reinterpret_cast<std::uintptr_t>(buf.data()), static_cast<std::uint32_t>(buf.size()), buf.mr().lkey()};
      ibv_send_wr wr{};
      wr.wr_id = 100 + posted;
      wr.sg_list = &sge;
      wr.num_sge = 1;
      wr.opcode = op;
      wr.send_flags = IBV_SEND_SIGNALED;
      wr.wr.rdma.remote_addr = raddr;
      wr.wr.rdma.rkey = rkey;
      if (const int rc = ep.qp.post_send(&wr); rc != 0) throw SystemError(std::string("ibv_post_send(") + what + ")", rc);
      ++posted;
    }
    wait_completion(ep.cq, timeout, what);
    ++done;
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return static_cast<double>(buf.size()) * iterations / (1024.0 * 1024.0) / secs;
}

void await_disconnect(rdma::EventChannel& ch, std::chrono::milliseconds timeout) {
  ch.expect(RDMA_CM_EVENT_DISCONNECTED, timeout, "disconnect", "the peer did not close the connection");
}

}  // namespace

struct RdmaSelftestServer::Impl {
  SelftestOptions opts;
  rdma::EventChannel channel;
  CmId listener{channel};
};

RdmaSelftestServer::RdmaSelftestServer(const SelftestOptions& opts) : impl_(new Impl{opts}) {
  const std::string where = (opts.address.empty() ? "0.0.0.0" : opts.address) + ":" + std::to_string(opts.port);
  const sockaddr_storage addr = resolve_ip(opts.address.empty() ? "0.0.0.0" : opts.address, opts.port);
  impl_->listener.bind(reinterpret_cast<const sockaddr*>(&addr), where);
  impl_->listener.listen(8);
  log()->info("RDMA self-test server listening on {}", where);
}

RdmaSelftestServer::~RdmaSelftestServer() = default;

rdma::PortInfo RdmaSelftestServer::port_info() const {
  if (!impl_->listener.verbs()) return {};
  return rdma::query_port(impl_->listener.verbs(), impl_->listener->port_num);
}

unsigned RdmaSelftestServer::serve(unsigned max_clients) {
  unsigned served = 0, good = 0;
  const auto timeout = impl_->opts.timeout;
  while (max_clients == 0 || served < max_clients) {
    auto ev = impl_->channel.next(std::chrono::hours(24));
    if (!ev) continue;
    if (ev->type() != RDMA_CM_EVENT_CONNECT_REQUEST) {
      log()->debug("ignoring {} on the listener", ev->name());
      continue;
    }
    ++served;
    CmId child = CmId::adopt(ev->id());
    SelftestConnect req{};
    const auto pd = ev->private_data();
    if (pd.size() >= sizeof req) std::memcpy(&req, pd.data(), sizeof req);
    ev.reset();  // acknowledge before we block on further events
    if (le32toh(req.magic) != kMagic || le16toh(req.version) != kVersion || le32toh(req.size) == 0 ||
        le32toh(req.size) > (256u << 20)) {
      log()->warn("rejecting a connection request that is not an ibdisk self-test v{}", kVersion);
      rdma_reject(child.get(), nullptr, 0);
      continue;
    }
    try {
      Endpoint ep(std::move(child), le32toh(req.size), /*server=*/true);
      fill_pattern(ep.remote.span(), 0x5e12e4);
      ep.post_recv();
      rdma_conn_param param{};
      param.responder_resources = kWindow;
      param.initiator_depth = kWindow;
      if (rdma_accept(ep.id.get(), &param) != 0) throw SystemError("rdma_accept", errno);
      impl_->channel.expect(RDMA_CM_EVENT_ESTABLISHED, timeout, "accept", "the client went away");

      SelftestMsg buffers = make_msg(MsgType::kBuffers);
      buffers.write_addr = htole64(reinterpret_cast<std::uintptr_t>(ep.local.data()));
      buffers.write_rkey = htole32(ep.local.mr().rkey());
      buffers.read_addr = htole64(reinterpret_cast<std::uintptr_t>(ep.remote.data()));
      buffers.read_rkey = htole32(ep.remote.mr().rkey());
      buffers.length = htole32(static_cast<std::uint32_t>(ep.local.size()));
      buffers.sha256 = sha256(ep.remote.span());
      ep.send(buffers, timeout);

      // The client's transfers take as long as they take: allow a generous wait.
      const SelftestMsg done = ep.receive(MsgType::kDone, timeout * 20);
      const auto written = sha256(ep.local.span());
      const bool ok = written == done.sha256;
      SelftestMsg result = make_msg(MsgType::kResult);
      result.status = htole32(ok ? 0 : -EIO);
      result.sha256 = written;
      ep.send(result, timeout);
      await_disconnect(impl_->channel, timeout);
      rdma_disconnect(ep.id.get());
      log()->info("client done: RDMA WRITE data sha256 {} {}", to_hex(written).substr(0, 16),
                  ok ? "matches" : "DOES NOT MATCH");
      if (ok) ++good;
    } catch (const std::exception& e) {
      log()->error("self-test client failed: {}", e.what());
    }
  }
  return good;
}

SelftestReport rdma_selftest_client(const SelftestOptions& opts) {
  using std::chrono::milliseconds;
  rdma::EventChannel channel;
  CmId id(channel);
  const std::string where = opts.address + ":" + std::to_string(opts.port);
  const sockaddr_storage dst = resolve_ip(opts.address, opts.port);
  sockaddr_storage src{};
  if (!opts.source.empty()) src = resolve_ip(opts.source, 0);
  id.resolve_addr(opts.source.empty() ? nullptr : reinterpret_cast<sockaddr*>(&src),
                  reinterpret_cast<const sockaddr*>(&dst), where, opts.timeout);
  channel.expect(RDMA_CM_EVENT_ADDR_RESOLVED, opts.timeout, "resolving " + where,
                 "is the peer reachable through an RDMA-capable interface?");
  id.resolve_route(opts.timeout);
  channel.expect(RDMA_CM_EVENT_ROUTE_RESOLVED, opts.timeout, "route to " + where,
                 "on InfiniBand a subnet manager must be running (opensm)");

  SelftestReport report;
  report.transport = "rdma";
  report.peer = where;
  report.port = rdma::query_port(id.verbs(), id->port_num);

  Endpoint ep(std::move(id), opts.size, /*server=*/false);
  fill_pattern(ep.local.span(), 0xc11e47);
  ep.post_recv();

  SelftestConnect req{htole32(kMagic), htole16(kVersion), 0, htole32(static_cast<std::uint32_t>(opts.size)),
                      htole32(opts.iterations)};
  rdma_conn_param param{};
  param.private_data = &req;
  param.private_data_len = sizeof req;
  param.responder_resources = kWindow;
  param.initiator_depth = kWindow;
  param.retry_count = 7;
  param.rnr_retry_count = 7;
  if (rdma_connect(ep.id.get(), &param) != 0) throw SystemError("rdma_connect(" + where + ")", errno);
  channel.expect(RDMA_CM_EVENT_ESTABLISHED, opts.timeout, "connecting to " + where,
                 "is `ibdisk selftest --listen` running on the peer, on this port?");

  const SelftestMsg buffers = ep.receive(MsgType::kBuffers, opts.timeout);
  if (le32toh(buffers.length) != opts.size) throw SystemError("self-test", std::string("server offered a buffer of the wrong size"));

  const auto op_timeout = opts.timeout * 4;
  report.write_mib_s = run_one_sided(ep, IBV_WR_RDMA_WRITE, ep.local, le64toh(buffers.write_addr),
                                     le32toh(buffers.write_rkey), opts.iterations, op_timeout);
  report.read_mib_s = run_one_sided(ep, IBV_WR_RDMA_READ, ep.remote, le64toh(buffers.read_addr),
                                    le32toh(buffers.read_rkey), opts.iterations, op_timeout);
  const auto read_digest = sha256(ep.remote.span());
  const auto write_digest = sha256(ep.local.span());
  report.read_sha256 = to_hex(read_digest);
  report.write_sha256 = to_hex(write_digest);

  ep.post_recv();
  SelftestMsg done = make_msg(MsgType::kDone);
  done.sha256 = write_digest;
  ep.send(done, opts.timeout);
  const SelftestMsg result = ep.receive(MsgType::kResult, opts.timeout);
  report.checksums_match = read_digest == buffers.sha256 && static_cast<std::int32_t>(le32toh(result.status)) == 0 &&
                           result.sha256 == write_digest;

  if (rdma_disconnect(ep.id.get()) != 0) throw SystemError("rdma_disconnect", errno);
  await_disconnect(channel, opts.timeout);
  return report;
}

std::string find_rdma_address() {
  ifaddrs* ifs = nullptr;
  if (::getifaddrs(&ifs) != 0) return {};
  std::string found;
  try {
    rdma::EventChannel channel;
    for (ifaddrs* i = ifs; i && found.empty(); i = i->ifa_next) {
      if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET) continue;
      CmId probe(channel);
      if (rdma_bind_addr(probe.get(), i->ifa_addr) == 0 && probe.verbs()) {
        char text[INET_ADDRSTRLEN];
        ::inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(i->ifa_addr)->sin_addr, text, sizeof text);
        found = text;
      }
    }
  } catch (const std::exception& e) {
    log()->debug("looking for an RDMA address: {}", e.what());
  }
  ::freeifaddrs(ifs);
  return found;
}

}  // namespace ibdisk
