#pragma once
// One queue of an ibdisk session on one worker thread, whatever transport carries it: the
// control state machine (Hello, Challenge, Auth, Welcome, then requests such as Open and
// GetStats) and the RequestPort of its commands. Owned by its worker; destroyed once the
// connection is closed and every one of its requests is FREE again.
#include <atomic>
#include <memory>
#include <string>
#include <unordered_map>

#include "target/request.h"
#include "target/worker.h"

namespace ibdisk::target {

class QueueHandler final : public transport::ServerConnection::Handler, public RequestPort {
 public:
  QueueHandler(Shared& shared, Worker& worker, std::shared_ptr<transport::ServerConnection> conn);
  ~QueueHandler() override;
  QueueHandler(const QueueHandler&) = delete;
  QueueHandler& operator=(const QueueHandler&) = delete;

  // Checks the peer (allow-list, local user) and starts the handshake clock.
  void start();
  // The target stops: new commands are answered -ESHUTDOWN; close once nothing is in flight.
  void begin_stop();
  // The stop deadline passed (or the queue is replaced): close now.
  void abort(const std::string& why);
  bool idle() const { return busy_ == 0; }
  std::string peer() const { return peer_; }

  // transport::ServerConnection::Handler
  void on_control(const proto::Control& msg) override;
  bool on_command(const wire::Command& cmd) override;
  void on_closed(const transport::CloseReason& reason) override;

  // RequestPort
  Resolved resolve(Request& req) override;
  bool acquire_slot(Request& req) override;
  void release_slot(Request& req) override;
  void receive_data(Request& req) override;
  void send_reply(Request& req) override;
  void request_done(Request& req) override;
  StorageEngine& engine() override { return *worker_.engine; }
  boost::asio::io_context& io() override { return worker_.io; }

 private:
  enum class State { kHello, kAuth, kFencing, kReady, kClosed };
  // Lets callbacks posted from other threads (a fence, a Welcome after one) find this queue
  // only while it lives; used on this queue's thread only.
  struct Life {
    QueueHandler* self;
    bool alive = true;
  };

  bool admissible(const transport::PeerInfo& p, std::string* why) const;
  void on_hello(const proto::Hello& h);
  void on_auth(const proto::Auth& a);
  void welcome();
  void fenced();
  void handshake_expired();
  // Session timeout (version 3): a check every quarter of it; a queue that received nothing
  // for all of it is closed as lost.
  void arm_liveness();
  void check_liveness();
  // A request waits on the target itself (a buffer, or its payload being moved in): the TCP
  // stream behind it is not read meanwhile, so the initiator's heartbeats cannot arrive.
  bool waits_on_target() const;
  std::shared_ptr<ExportLease> lookup(std::uint32_t handle);
  void fill_stats(proto::Stats* s);
  void fail_with(proto::ErrorCode code, const std::string& text);
  void maybe_destroy();

  Shared& shared_;
  Worker& worker_;
  std::shared_ptr<transport::ServerConnection> conn_;
  std::string peer_;
  std::shared_ptr<Life> life_;
  boost::asio::steady_timer timer_;  // the handshake's deadline, then the grace of a failing close
  boost::asio::steady_timer liveness_;
  std::uint32_t version_ = 0;  // negotiated in Hello
  bool heard_ = false;         // something arrived since the last liveness check
  bool enforce_liveness_ = false;  // version 3 and a session timeout: silence closes the queue
  bool timed_out_ = false;     // closed for silence: lost, so the session gets its rejoin grace
  std::shared_ptr<std::atomic<std::int64_t>> last_heard_ = std::make_shared<std::atomic<std::int64_t>>(0);
  State state_ = State::kHello;
  proto::Hello hello_;
  std::string server_nonce_;
  bool new_session_ = false;
  std::shared_ptr<Session> session_;
  std::uint32_t queue_id_ = 0;
  std::unordered_map<std::uint32_t, std::weak_ptr<ExportLease>> cache_;  // never keeps an export open
  std::uint64_t cache_version_ = 0;
  std::uint32_t last_handle_ = 0;
  std::weak_ptr<ExportLease> last_lease_;
  unsigned depth_ = 0;
  std::uint32_t max_io_ = 0;
  std::unique_ptr<Request[]> requests_;
  unsigned capacity_ = 0;
  std::vector<Request*> free_;
  unsigned busy_ = 0;       // requests not FREE
  unsigned unreplied_ = 0;  // requests whose reply has not been handed to the transport
  bool refused_ = false;    // on_command() said "not now": resume the transport when one frees
  SlotPool::Account account_;
  bool stopping_ = false;
  bool destroying_ = false;
  bool lost_to_error_ = false;
  std::string last_reason_;
};

}  // namespace ibdisk::target
