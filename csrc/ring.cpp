// Executor of the exact ring all-reduce's schedule over two connected TCP sockets.
//
// Python plans the ring (src/lococomm/collectives/ring_plan.py) and hands over two lists in
// issue order: the receives (byte ranges of the result buffer R, filled from the left
// neighbour's stream, each with an action to run once complete) and the sends (byte ranges of x
// or R streamed to the right neighbour, each waiting for one receive). This file only moves
// the bytes: one thread, non-blocking sockets, poll(2), no other threads and no Python, so a
// hop costs no thread hand-off (the Python-driven ring over gloo pair groups pays two per hop,
// which on a few oversubscribed cores cost more than a backup copy of the tensor).
//
// Both ends of a link walk the same schedule, so a TCP stream needs no framing: the k-th
// receive of a member is byte for byte the k-th send of its left neighbour. Each stream opens
// with the sender's collective signature (a few int64 fields: kind, op, dtype, numel, shape);
// the receiver compares it with its own before it reads a single data byte, and stops with
// "signature mismatch" if they differ. Equal neighbours all around the ring mean equal
// members, and equal signatures mean equal byte counts, so the streams cannot drift.
//
// The combine (R[range] op= x[range], then / W for a mean at the owner's stage) goes through
// ATen on narrowed tensors, so it rounds exactly like the torch reference ring.
//
// Failure never throws past this file: the call returns a reason ("peer closed the
// connection", "aborted", "timed out", an errno text) and the caller abandons the sockets. The
// one exception is a Python signal handler that raises during the wait (Ctrl-C): its
// exception propagates. An abort is noticed whenever the ring waits; a ring whose data keeps
// flowing finishes first (its peers are alive).
#include <torch/extension.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <string>

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "poll_wait.h"

namespace {

enum Action : int64_t { kForward = 0, kCombine = 1, kCombineDivide = 2 };
enum Source : int64_t { kFromX = 0, kFromResult = 1 };
enum Op : int64_t { kSum = 0, kMax = 1, kMin = 2 };

// Receives: [n, 3] int64 rows (start element, end element, action).
// Sends:    [n, 4] int64 rows (start element, end element, source, receive index it needs
//           complete, -1 for none).
struct Schedule {
  const int64_t* recvs;
  int64_t n_recvs;
  const int64_t* sends;
  int64_t n_sends;
};

class RingRun {
 public:
  RingRun(int left, int right, int abort_fd, const at::Tensor& x, at::Tensor& result,
          const Schedule& s, int64_t op, int64_t world, const at::Tensor& header,
          at::Tensor& left_header)
      : left_(left), right_(right), abort_fd_(abort_fd), x_(x), result_(result), s_(s), op_(op),
        world_(world), elem_(x.element_size()),
        xbytes_(static_cast<char*>(const_cast<void*>(x.data_ptr()))),
        rbytes_(static_cast<char*>(result.data_ptr())),
        header_(static_cast<const char*>(header.data_ptr())),
        left_header_(static_cast<char*>(left_header.data_ptr())),
        header_bytes_(header.numel() * header.element_size()) {}

  std::string run(double timeout_seconds) {
    std::string err = run_loop(timeout_seconds);
    if (low_water_ != 1) {  // leave the socket as we found it (the reference does not set it)
      const int one = 1;
      ::setsockopt(left_, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof(one));
    }
    return err;
  }

 private:
  std::string run_loop(double timeout_seconds) {
    using clock = std::chrono::steady_clock;
    // clamped: a huge duration would overflow the clock's nanoseconds
    const double seconds = std::min(std::max(timeout_seconds, 0.0), 1e7);
    const auto deadline =
        clock::now() + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(seconds));
    while (recv_i_ < s_.n_recvs || send_i_ < s_.n_sends || !header_checked_ ||
           header_out_ < header_bytes_) {
      bool progressed = false;
      std::string err = pump_header(&progressed);
      if (!err.empty()) return err;
      err = pump_recv(&progressed);
      if (!err.empty()) return err;
      err = pump_send(&progressed);
      if (!err.empty()) return err;
      if (progressed) continue;
      if (header_in_ == header_bytes_ && !header_checked_ && header_out_ == header_bytes_) {
        return "signature mismatch";
      }
      // Nothing moved: sleep in poll until a socket is ready, the abort pipe is written or
      // the deadline passes (in slices, so a clock jump cannot park us for long).
      const auto left_ms =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now()).count();
      if (left_ms <= 0) return "timed out waiting for peers";
      pollfd fds[3];
      int n = 0;
      fds[n++] = {abort_fd_, POLLIN, 0};
      const bool want_recv =
          header_in_ < header_bytes_ || (header_checked_ && recv_i_ < s_.n_recvs);
      const bool want_send = header_out_ < header_bytes_ || send_ready();
      if (want_recv) {
        fds[n++] = {left_, POLLIN, 0};
        set_low_water();
      }
      if (want_send) fds[n++] = {right_, POLLOUT, 0};
      // (other signals -- SIGCHLD, ... -- go on with the ring)
      err = lococomm::poll_once(fds, n, static_cast<int>(std::min<int64_t>(left_ms, 100)),
                                "ring socket closed under the executor");
      if (!err.empty()) return err;
    }
    return "";
  }

  // Wake up only when a useful amount has arrived (SO_RCVLOWAT, honoured by poll): on a slow
  // link data trickles in packet by packet, and a wake-up per packet steals the core from
  // the computation the ring is meant to overlap with.
  void set_low_water() {
    int64_t want = 1;
    if (header_in_ < header_bytes_) {
      want = header_bytes_ - header_in_;
    } else if (header_checked_ && recv_i_ < s_.n_recvs) {
      const int64_t* row = recv_row(recv_i_);
      want = (row[1] - row[0]) * elem_ - recv_off_;
    }
    const int low = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, kLowWater)));
    if (low != low_water_ && ::setsockopt(left_, SOL_SOCKET, SO_RCVLOWAT, &low, sizeof(low)) == 0) {
      low_water_ = low;
    }
  }

  // Reads what the left socket has into dst[*done, total). "" when complete or nothing is
  // there yet (*done tells which), else why the stream ended.
  std::string read_into(char* dst, int64_t total, int64_t* done, bool* progressed) {
    while (*done < total) {
      const ssize_t got = ::recv(left_, dst + *done, total - *done, MSG_DONTWAIT);
      if (got > 0) {
        *done += got;
        *progressed = true;
        continue;
      }
      if (got == 0) return "peer closed the connection (left neighbour)";
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return "";
      return std::string("receive from left neighbour failed: ") + std::strerror(errno);
    }
    return "";
  }

  // Writes src[*done, total) to the right socket as far as it takes it; "" or why it failed.
  std::string write_from(const char* src, int64_t total, int64_t* done, bool* progressed) {
    while (*done < total) {
      const ssize_t put = ::send(right_, src + *done, total - *done, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (put > 0) {
        *done += put;
        *progressed = true;
        continue;
      }
      if (put < 0 && errno == EINTR) continue;
      if (put < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return "";
      return send_failed(put < 0 ? std::strerror(errno) : "no progress");
    }
    return "";
  }

  // A member that finds a mismatch stops and closes its sockets, and the failures travel
  // around the ring; if our left neighbour's differing signature is already here, that is
  // the news to report rather than the broken connection it caused.
  std::string send_failed(const char* why) {
    if (!header_checked_) {
      bool ignored = false;
      read_into(left_header_, header_bytes_, &header_in_, &ignored);  // whatever has arrived
      if (header_in_ == header_bytes_ && std::memcmp(header_, left_header_, header_bytes_) != 0) {
        return "signature mismatch";
      }
    }
    return std::string("send to right neighbour failed: ") + why;
  }

  const int64_t* recv_row(int64_t i) const { return s_.recvs + 3 * i; }
  const int64_t* send_row(int64_t i) const { return s_.sends + 4 * i; }

  bool send_ready() const {
    if (send_i_ >= s_.n_sends) return false;
    const int64_t need = send_row(send_i_)[3];
    return need < recv_i_;  // every receive before recv_i_ is complete (and combined)
  }

  std::string pump_recv(bool* progressed) {
    std::string err = read_into(left_header_, header_bytes_, &header_in_, progressed);
    if (!err.empty() || header_in_ < header_bytes_) return err;
    if (!header_checked_) {
      if (std::memcmp(header_, left_header_, header_bytes_) != 0) {
        if (header_out_ == header_bytes_) return "signature mismatch";
        return "";  // read nothing more; stop once our own signature is out (run())
      }
      header_checked_ = true;
    }
    while (recv_i_ < s_.n_recvs) {
      const int64_t* row = recv_row(recv_i_);
      const int64_t total = (row[1] - row[0]) * elem_;
      err = read_into(rbytes_ + row[0] * elem_, total, &recv_off_, progressed);
      if (!err.empty() || recv_off_ < total) return err;
      finish_recv(row);
      recv_i_++;
      recv_off_ = 0;
      *progressed = true;
      // Let the send that just became ready go out before reading more.
      if (send_ready()) return "";
    }
    return "";
  }

  // Our signature goes out before anything else, and before we give up on a mismatch, so the
  // right neighbour can name the mismatch too instead of only seeing the connection close.
  std::string pump_header(bool* progressed) {
    return write_from(header_, header_bytes_, &header_out_, progressed);
  }

  std::string pump_send(bool* progressed) {
    if (header_out_ < header_bytes_) return "";
    while (send_ready()) {
      const int64_t* row = send_row(send_i_);
      const int64_t total = (row[1] - row[0]) * elem_;
      const char* base = (row[2] == kFromX ? xbytes_ : rbytes_) + row[0] * elem_;
      std::string err = write_from(base, total, &send_off_, progressed);
      if (!err.empty() || send_off_ < total) return err;
      send_i_++;
      send_off_ = 0;
      *progressed = true;
    }
    return "";
  }

  void finish_recv(const int64_t* row) {
    if (row[2] == kForward) return;
    at::Tensor acc = result_.narrow(0, row[0], row[1] - row[0]);
    const at::Tensor mine = x_.narrow(0, row[0], row[1] - row[0]);
    if (op_ == kSum) {
      acc.add_(mine);
    } else if (op_ == kMax) {
      at::maximum_out(acc, acc, mine);
    } else {
      at::minimum_out(acc, acc, mine);
    }
    if (row[2] == kCombineDivide) acc.div_(world_);
  }

  const int left_, right_, abort_fd_;
  const at::Tensor& x_;
  at::Tensor& result_;
  const Schedule s_;
  const int64_t op_, world_, elem_;
  char* xbytes_;
  char* rbytes_;
  const char* header_;
  char* left_header_;
  const int64_t header_bytes_;
  int64_t header_in_ = 0, header_out_ = 0;
  bool header_checked_ = false;
  int64_t recv_i_ = 0, recv_off_ = 0, send_i_ = 0, send_off_ = 0;
  static constexpr int64_t kLowWater = 256 << 10;  // bytes
  int low_water_ = -1;  // the socket's SO_RCVLOWAT as we last set it (-1: not yet)
};

}  // namespace

// Runs the schedule; "" on success, else why it stopped (the sockets are then unusable).
// `header` (this member's signature) goes first; the left neighbour's lands in `left_header`.
std::string ring_allreduce(int64_t left_fd, int64_t right_fd, int64_t abort_fd,
                           const at::Tensor& x, at::Tensor& result, const at::Tensor& recvs,
                           const at::Tensor& sends, int64_t op, int64_t world,
                           double timeout_seconds, const at::Tensor& header,
                           at::Tensor& left_header) {
  TORCH_CHECK(x.device().is_cpu() && result.device().is_cpu(), "ring tensors must be on the CPU");
  TORCH_CHECK(x.is_contiguous() && result.is_contiguous(), "ring tensors must be contiguous");
  TORCH_CHECK(x.dim() == 1 && result.dim() == 1 && x.numel() == result.numel(),
              "x and result must be flat and of one length");
  TORCH_CHECK(x.scalar_type() == result.scalar_type(), "x and result must share a dtype");
  TORCH_CHECK(recvs.scalar_type() == at::kLong && recvs.is_contiguous() && recvs.dim() == 2 &&
                  recvs.size(1) == 3,
              "recvs must be a contiguous int64 [n, 3] tensor");
  TORCH_CHECK(sends.scalar_type() == at::kLong && sends.is_contiguous() && sends.dim() == 2 &&
                  sends.size(1) == 4,
              "sends must be a contiguous int64 [n, 4] tensor");
  TORCH_CHECK(op >= kSum && op <= kMin, "op must be 0 (sum), 1 (max) or 2 (min)");
  TORCH_CHECK(header.scalar_type() == at::kLong && header.is_contiguous() && header.dim() == 1 &&
                  header.numel() >= 1,
              "header must be a non-empty contiguous int64 vector");
  TORCH_CHECK(left_header.scalar_type() == at::kLong && left_header.is_contiguous() &&
                  left_header.numel() == header.numel(),
              "left_header must be a contiguous int64 vector as long as header");
  TORCH_CHECK(world >= 2, "a ring needs at least 2 members");
  const int64_t n = x.numel();
  const int64_t* rv = recvs.data_ptr<int64_t>();
  for (int64_t i = 0; i < recvs.size(0); ++i) {
    TORCH_CHECK(0 <= rv[3 * i] && rv[3 * i] < rv[3 * i + 1] && rv[3 * i + 1] <= n,
                "receive ", i, " has a bad range");
    TORCH_CHECK(rv[3 * i + 2] >= kForward && rv[3 * i + 2] <= kCombineDivide,
                "receive ", i, " has a bad action");
  }
  const int64_t* sv = sends.data_ptr<int64_t>();
  for (int64_t i = 0; i < sends.size(0); ++i) {
    TORCH_CHECK(0 <= sv[4 * i] && sv[4 * i] < sv[4 * i + 1] && sv[4 * i + 1] <= n,
                "send ", i, " has a bad range");
    TORCH_CHECK(sv[4 * i + 2] == kFromX || sv[4 * i + 2] == kFromResult,
                "send ", i, " has a bad source");
    TORCH_CHECK(sv[4 * i + 3] >= -1 && sv[4 * i + 3] < recvs.size(0),
                "send ", i, " waits for a receive that does not exist");
  }
  Schedule s{rv, recvs.size(0), sv, sends.size(0)};
  RingRun ring(static_cast<int>(left_fd), static_cast<int>(right_fd), static_cast<int>(abort_fd),
               x, result, s, op, world, header, left_header);
  pybind11::gil_scoped_release nogil;
  at::NoGradGuard no_grad;
  return ring.run(timeout_seconds);
}
