#include "initiator/attach.h"

#include <fcntl.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "initiator/attachment.h"

namespace ibdisk::initiator {
namespace attach_internal {

Attachment::~Attachment() {
  for (auto& s : socks_) {
    if (s->sd) s->sd->release();
    s->sd.reset();
    for (const int fd : {s->fd, s->kernel_fd, s->pipe_r, s->pipe_w}) {
      if (fd >= 0) ::close(fd);
    }
  }
  if (sig_sd_) sig_sd_->release();
  sig_sd_.reset();
  if (sigfd_ >= 0) ::close(sigfd_);
  // Gone without detaching (an exception): the state file stays, so the next attach of the
  // export finds the device the kernel keeps and takes it over.
  if (detached_ && !state_file_.empty()) ::unlink(state_file_.c_str());
}

void Attachment::start_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGHUP);
  sigaddset(&set, SIGUSR1);  // hand the device off to the next attach (systemctl restart)
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  sigfd_ = ::signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
  if (sigfd_ < 0) throw SystemError("signalfd", errno);
}

void Attachment::connect_session() {
  auto c = Client::connect(opts_.client);
  proto::Opened o = c->open(opts_.export_name, opts_.read_only);
  if (client_ == nullptr && opened_.info().size() != 0 && o.info().size() != opened_.info().size()) {
    log()->error("export '{}' on {} is now {} bytes, was {}: the device keeps the old size; I/O beyond the end fails",
                 opts_.export_name, where(), o.info().size(), opened_.info().size());
  }
  transport_ = c->transport(0);
  opened_ = o;
  c->register_memory(pool_.base(), pool_.size());
  client_ = std::move(c);
}

// A device whose attach process died through the ioctl interface has failed its I/O and
// keeps its dead sockets until it is disconnected: when our state file says so, this attach
// disconnects it and starts afresh.
void Attachment::reclaim_stale(int index) {
  if (index < 0 || !nbd_device_connected(index)) return;
  for (const auto& st : list_attachments(opts_.state_dir)) {
    if (st.index != index || st.alive || st.kernel == "netlink") continue;
    log()->warn("{}: reclaiming it from an earlier attach (pid {}, {}/{}) that exited without detaching", st.device, st.pid,
                st.target, st.export_name);
    nbd_disconnect_index(index);
    for (int i = 0; i < 100 && nbd_device_connected(index); ++i) ::usleep(20000);
    ::unlink(st.file.c_str());
  }
}

// A netlink device of this export whose attach process is gone (the state file says which):
// the kernel still holds its I/O, so this attach takes it over instead of making a new one.
std::optional<AttachState> Attachment::find_orphan() const {
  if (opts_.kernel == KernelInterface::kIoctl) return std::nullopt;
  for (const auto& st : list_attachments(opts_.state_dir)) {
    if (st.alive || st.kernel != "netlink" || st.target != where() || st.export_name != opts_.export_name) continue;
    if (opts_.device_index >= 0 && st.index != opts_.device_index) continue;
    if (!nbd_device_connected(st.index) || st.queues == 0) continue;
    const std::string backend = nbd_device_backend(st.index);
    if (backend != backend_id()) {
      log()->warn("{}: left by attach pid {} for {}/{}, but the kernel names its backend '{}', not '{}': not taking it over",
                  st.device, st.pid, st.target, st.export_name, backend, backend_id());
      continue;
    }
    return st;
  }
  return std::nullopt;
}

// Taking a device over, the kernel holds its I/O until we are back: the target being away or
// still busy with the dead process's session (an exclusive export) is waited for, as an
// outage is, rather than given up on.
void Attachment::connect_for_takeover() {
  const auto since = Clock::now();
  milliseconds backoff = kFirstBackoff;
  std::string last;
  for (unsigned attempt = 1;; ++attempt) {
    try {
      return connect_session();
    } catch (const std::exception& e) {
      if (!opts_.reconnect_forever && Clock::now() - since >= opts_.reconnect_timeout) throw;
      if (e.what() != last) {
        log()->warn("{}: connecting to {} to take the device over (attempt {}): {}; trying again", orphan_->device, where(),
                    attempt, e.what());
        last = e.what();
      }
    }
    signalfd_siginfo si{};
    if (::read(sigfd_, &si, sizeof si) == static_cast<ssize_t>(sizeof si)) {
      throw SystemError("taking over " + orphan_->device, std::string(strsignal(static_cast<int>(si.ssi_signo))) + " received",
                        "the kernel still holds its I/O: run the attach again, or `ibdisk detach " + orphan_->device + "`");
    }
    std::this_thread::sleep_for(backoff);
    backoff = std::min(backoff * 2, kMaxBackoff);
  }
}

void Attachment::attach_device() {
  const auto& info = opened_.info();
  tflags_ = nbd::kFlagHasFlags;
  if (opts_.read_only || info.read_only()) tflags_ |= nbd::kFlagReadOnly;
  if (opened_.flush()) tflags_ |= nbd::kFlagSendFlush;
  if (opened_.fua()) tflags_ |= nbd::kFlagSendFua;
  if (opened_.trim() && !(tflags_ & nbd::kFlagReadOnly)) tflags_ |= nbd::kFlagSendTrim;
  if (opened_.write_zeroes() && !(tflags_ & nbd::kFlagReadOnly)) tflags_ |= nbd::kFlagSendWriteZeroes;

  NbdConfig cfg;
  cfg.index = opts_.device_index;
  cfg.size_bytes = info.size();
  cfg.block_size = std::clamp<std::uint64_t>(info.block_size(), 512, 4096);
  cfg.timeout_s = static_cast<std::uint64_t>(opts_.kernel_timeout.count());
  cfg.dead_conn_timeout_s =
      opts_.reconnect_forever
          ? kForeverS
          : static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::seconds>(opts_.reconnect_timeout).count()) +
                kDeadConnMarginS;
  cfg.backend = backend_id();

  const std::optional<AttachState>& orphan = orphan_;
  // As many sockets as the device has: the kernel never changes their number.
  const unsigned queues = orphan ? orphan->queues : client_->queue_count();
  // One session, one export handle: a flush on any queue covers writes completed on all.
  if (queues > 1) tflags_ |= nbd::kFlagCanMultiConn;
  cfg.server_flags = tflags_;
  for (unsigned q = 0; q < queues; ++q) {
    auto s = std::make_unique<KernelSocket>();
    s->q = q;
    make_socket(*s);
    cfg.sockets.push_back(s->kernel_fd);
    socks_.push_back(std::move(s));
  }
  if (orphan) {
    if (orphan->size != info.size()) {
      log()->error("export '{}' on {} is now {} bytes, was {}: the device keeps the old size; I/O beyond the end fails",
                   opts_.export_name, where(), info.size(), orphan->size);
    }
    log()->warn("{}: taking it over from attach pid {}, which exited without detaching; the kernel held its I/O",
                orphan->device, orphan->pid);
    takeovers_ = orphan->takeovers + 1;
    reconnects_ = orphan->reconnects;
    renewed_ = orphan->sockets_renewed;
    last_error_ = "attach pid " + std::to_string(orphan->pid) + " exited without detaching";
    dev_ = NbdDevice::take_over(orphan->index, cfg);
    ::unlink(orphan->file.c_str());
    return;
  }
  reclaim_stale(opts_.device_index);
  dev_ = NbdDevice::connect(cfg, opts_.kernel);
  // Requests as large as one ibdisk command where the kernel allows it: fewer splits.
  const std::string max_kb = "/sys/block/nbd" + std::to_string(dev_->index()) + "/queue/max_sectors_kb";
  std::ofstream(max_kb) << (client_->max_io() / 1024) << '\n';
}

void Attachment::arm_signals() {
  if (sig_armed_ || !sig_sd_) return;
  sig_armed_ = true;
  sig_sd_->async_wait(asio::posix::stream_descriptor::wait_read, [this, epoch = sig_epoch_](const boost::system::error_code& ec) {
    if (epoch != sig_epoch_) return;
    sig_armed_ = false;
    if (ec) return;
    on_signal();
    arm_signals();
  });
}

void Attachment::on_signal() {
  signalfd_siginfo si{};
  while (::read(sigfd_, &si, sizeof si) == static_cast<ssize_t>(sizeof si)) {
    if (si.ssi_signo == SIGUSR1 && dev_ && dev_->interface() == KernelInterface::kNetlink && !stop_requested_) {
      log()->info("SIGUSR1 received: leaving {} to the next `ibdisk attach` of {}/{} (the kernel holds its I/O)", dev_->path(),
                  where(), opts_.export_name);
      hand_off_ = true;
      continue;
    }
    if (stop_requested_ || hand_off_ || si.ssi_signo == SIGUSR1) continue;
    log()->info("{} received: detaching {} once in-flight requests are answered", strsignal(static_cast<int>(si.ssi_signo)),
                dev_ ? dev_->path() : std::string("the device"));
    stop_requested_ = true;
    stop_deadline_ = Clock::now() + kDrainOnStop;
    write_state("detaching");
  }
  wake_ = true;
}

void Attachment::on_lost(const std::string& reason) {
  std::size_t held = 0;
  for (const auto& s : socks_) held += s->active.size();
  const std::string limit = opts_.reconnect_forever
                                ? std::string("with no time limit")
                                : "for up to " + std::to_string(std::chrono::duration_cast<std::chrono::seconds>(opts_.reconnect_timeout).count()) +
                                      " s (--reconnect-timeout)";
  log()->warn("{}: session with {} lost ({}); holding {} request(s) and reconnecting {}", dev_->path(), where(), reason, held,
              limit);
  ++gen_;
  release_all();  // off the session's io_context before it goes
  client_.reset();
  bind_all();
  for (auto& s : socks_) {
    for (auto& [raw, r] : s->active) r->submitted = false;
  }
  lost_since_ = Clock::now();
  backoff_ = kFirstBackoff;
  next_attempt_ = lost_since_ + backoff_;
  attempts_ = 0;
  last_failure_.clear();
  last_error_ = reason;
  write_state("reconnecting");
}

void Attachment::try_reconnect() {
  ++attempts_;
  try {
    connect_session();
  } catch (const std::exception& e) {
    const std::string why = e.what();
    const auto elapsed = Clock::now() - lost_since_;
    if (why != last_failure_) {
      log()->warn("{}: reconnecting to {} (attempt {}, {:.1f} s since the loss): {}", dev_->path(), where(), attempts_,
                  seconds(elapsed), why);
      last_failure_ = why;
      last_error_ = why;
      write_state(state_);
    } else {
      log()->debug("{}: reconnect attempt {} failed: {}", dev_->path(), attempts_, why);
    }
    backoff_ = std::min(backoff_ * 2, kMaxBackoff);
    next_attempt_ = Clock::now() + backoff_;
    return;
  }
  ++gen_;
  ++reconnects_;
  std::size_t resubmit = 0;
  for (const auto& s : socks_) resubmit += s->active.size();
  log()->info("{}: reconnected to {} over {} after {:.1f} s ({} attempt(s)); sending {} held request(s) again", dev_->path(),
              where(), transport_, seconds(Clock::now() - lost_since_), attempts_, resubmit);
  if (failing_) log()->info("{}: I/O works again", dev_->path());
  failing_ = false;
  bind_all();
  write_state("connected");
  for (auto& s : socks_) {
    std::vector<Request*> resend;
    for (auto& [raw, r] : s->active) resend.push_back(raw);
    for (Request* r : resend) {
      if (!client_) break;
      if (s->active.count(r)) submit(*s, r);
    }
  }
}

void Attachment::fail_held() {
  failing_ = true;
  std::size_t n = 0;
  for (auto& s : socks_) {
    std::vector<Request*> resend;
    for (auto& [raw, r] : s->active) resend.push_back(raw);
    n += resend.size();
    for (Request* r : resend) {
      auto it = s->active.find(r);
      auto owned = std::move(it->second);
      s->active.erase(it);
      reply(*s, std::move(owned), nbd::kEio, false);
    }
  }
  log()->error("{}: the target {} has been unreachable for {:.0f} s (--reconnect-timeout): failing {} held request(s) "
               "with EIO, and new I/O until it is back; still reconnecting ({})",
               dev_->path(), where(), seconds(Clock::now() - lost_since_), n, last_failure_);
  write_state("failing");
}

void Attachment::write_state(const std::string& state) {
  state_ = state;
  if (!dev_) return;
  nlohmann::json j;
  j["device"] = dev_->path();
  j["index"] = dev_->index();
  j["target"] = where();
  j["export"] = opts_.export_name;
  j["transport"] = transport_;
  j["kernel"] = to_string(dev_->interface());
  j["queues"] = socks_.size();
  j["size"] = opened_.info().size();
  j["read_only"] = (tflags_ & nbd::kFlagReadOnly) != 0;
  j["pid"] = ::getpid();
  j["state"] = state;
  j["since"] = utc_now();
  j["reconnects"] = reconnects_;
  j["takeovers"] = takeovers_;
  j["sockets_renewed"] = renewed_;
  j["last_error"] = last_error_;
  ::mkdir(opts_.state_dir.c_str(), 0755);
  state_file_ = state_file_for(opts_.state_dir, dev_->index());
  const std::string tmp = state_file_ + ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << j.dump(2) << '\n';
    if (!f) {
      log()->warn("cannot write {}: {} (`ibdisk list` will not show {})", tmp, errno_text(errno), dev_->path());
      return;
    }
  }
  if (::rename(tmp.c_str(), state_file_.c_str()) != 0) log()->warn("rename {}: {}", tmp, errno_text(errno));
}

int Attachment::run() {
  if (!nbd_module_loaded()) {
    throw SystemError("attach " + opts_.export_name, std::string("the nbd module is not loaded"),
                      "load it: modprobe nbd (add nbds_max=N for more devices)", ENOENT);
  }
  start_signals();
  orphan_ = find_orphan();
  if (orphan_) {
    connect_for_takeover();
  } else {
    connect_session();
  }
  attach_device();
  write_state("connected");
  log()->info("{} is {}/{} ({}, {} queue(s), {} bytes{}, kernel interface {})", dev_->path(), where(), opts_.export_name,
              transport_, socks_.size(), opened_.info().size(), (tflags_ & nbd::kFlagReadOnly) ? ", read-only" : "",
              to_string(dev_->interface()));
  if (opts_.on_ready) opts_.on_ready(dev_->path());
  bind_all();

  for (;;) {
    if (stop_requested_ && !disconnect_sent_ && (outstanding() == 0 || Clock::now() >= stop_deadline_ || !client_)) {
      if (outstanding() != 0) log()->warn("{}: disconnecting with {} request(s) unanswered", dev_->path(), outstanding());
      disconnect_sent_ = true;
      dev_->disconnect();
    }
    if (hand_off_) {
      log()->info("{}: exiting without detaching; {} request(s) unanswered go to the next attach", dev_->path(), outstanding());
      write_state("recovering");
      return 0;
    }
    renew_dead_sockets();
    if (all_closed()) break;
    if (disconnect_sent_ && Clock::now() >= stop_deadline_ + kDrainOnStop) {
      log()->warn("{}: the kernel did not close its sockets after the disconnect; exiting", dev_->path());
      break;
    }
    wake_ = false;
    if (client_) {
      try {
        client_->run_until([&] {
          return wake_ || hand_off_ || (stop_requested_ && !disconnect_sent_ && (outstanding() == 0 || Clock::now() >= stop_deadline_)) ||
                 (disconnect_sent_ && Clock::now() >= stop_deadline_ + kDrainOnStop);
        });
      } catch (const std::exception& e) {
        on_lost(e.what());
      }
      continue;
    }
    // No session: serve the kernel sockets (holding their requests) until the next attempt.
    const auto until = stop_requested_ ? Clock::now() + milliseconds(200) : next_attempt_;
    while (!wake_ && Clock::now() < until) {
      idle_io_.restart();
      idle_io_.run_one_until(until);
    }
    if (stop_requested_ || all_closed()) continue;
    if (!failing_ && !opts_.reconnect_forever && Clock::now() - lost_since_ >= opts_.reconnect_timeout) fail_held();
    if (Clock::now() >= next_attempt_) try_reconnect();
  }
  detached_ = true;
  log()->info("{} detached from {}/{}", dev_->path(), where(), opts_.export_name);
  dev_.reset();
  return 0;
}

}  // namespace attach_internal

int run_attach(const AttachOptions& opts) {
  attach_internal::Attachment a(opts);
  return a.run();
}

}  // namespace ibdisk::initiator
