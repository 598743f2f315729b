// Executor of healing's state transfer over TCP streams (one per source -> receiver pair).
//
// Python plans the transfer (src/lococomm/ft/healing.py): the state's bytes are cut into
// chunks, each chunk a list of byte ranges ("pieces") of the state's tensors, and each stream
// carries the chunks one source owns, in order. This file only moves the bytes: one thread,
// non-blocking sockets, poll(2), no Python, several streams at once (a receiver reads from
// every source in parallel; a source writes to every receiver).
//
// Stream format: a fixed header (the sender's, compared by the receiver before it reads a data
// byte: layout hash, chunk count, byte count), then per chunk its bytes followed by an 8-byte
// little-endian checksum of them (kernels.h checksum, computed while the socket has nothing to
// give or take: a sender hashes ahead, a receiver what has arrived). A receiver stops at the
// first chunk whose checksum differs.
//
// Pieces are written in place: the receiver's pieces are the live tensors' memory. Once this
// call returns nothing touches them any more (unlike an abandoned gloo receive, which may
// still write later), so no staging copy is needed. On failure the pieces hold a mix of old and
// new bytes; the caller knows the state is then not to be trusted.
//
// Failure never throws past this file, except a Python signal handler that raises during a
// wait (Ctrl-C): the call returns a reason ("stream 1: peer closed the connection", "aborted",
// "timed out", a checksum mismatch) and the caller closes the sockets.
#include <torch/extension.h>

#include <sys/socket.h>
#include <sys/uio.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"
#include "poll_wait.h"

namespace {

constexpr int kMaxIov = 64;  // pieces per sendmsg/recvmsg call
constexpr int64_t kHashSlice = 256 << 10;  // bytes hashed per wait before looking at the socket again

struct Stream {
  int fd = -1;
  std::vector<uint8_t*> ptr;     // pieces
  std::vector<int64_t> len;      // their sizes, bytes
  std::vector<int64_t> ends;     // chunk c covers pieces [ends[c - 1], ends[c])
  const uint8_t* header = nullptr;  // ours (sending) or the one we expect (receiving)
  int64_t header_bytes = 0;
  std::vector<uint8_t> header_in;
  int64_t header_done = 0;
  int64_t chunk = 0, piece = 0, offset = 0;  // position in the data
  bool in_trailer = false;
  uint8_t trailer[8] = {};
  int64_t trailer_done = 0;
  // The checksum runs on its own cursor, in the time the socket has nothing to give or take
  // (a sender may hash ahead of what it sent; a receiver hashes what has arrived), so it
  // fills waits instead of lengthening the transfer.
  int64_t hash_chunk = 0, hash_piece = 0, hash_offset = 0;
  lococomm::ChecksumStream hash;
  std::vector<uint64_t> chunk_sums;  // checksum of each chunk hashed so far

  bool done() const { return header_done == header_bytes && chunk == static_cast<int64_t>(ends.size()); }
  int64_t chunk_begin() const { return chunk == 0 ? 0 : ends[chunk - 1]; }
};

std::string prefix(size_t index) { return "stream " + std::to_string(index) + ": "; }

class Transfer {
 public:
  Transfer(std::vector<Stream>& streams, bool sending, int abort_fd)
      : streams_(streams), sending_(sending), abort_fd_(abort_fd) {}

  std::string run(double timeout_seconds) {
    using clock = std::chrono::steady_clock;
    const double seconds = std::min(std::max(timeout_seconds, 0.0), 1e7);  // no clock overflow
    const auto deadline =
        clock::now() + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(seconds));
    std::vector<pollfd> fds;
    while (true) {
      bool progressed = false, all_done = true;
      for (size_t i = 0; i < streams_.size(); ++i) {
        Stream& s = streams_[i];
        if (s.done()) continue;
        std::string err = sending_ ? pump_send(s, &progressed) : pump_recv(s, &progressed);
        if (!err.empty()) return prefix(i) + err;
        all_done = all_done && s.done();
      }
      if (all_done) return "";
      if (progressed) continue;
      const auto left_ms =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now()).count();
      if (left_ms <= 0) return "timed out";
      fds.clear();
      fds.push_back({abort_fd_, POLLIN, 0});
      for (const Stream& s : streams_) {
        if (!s.done()) fds.push_back({s.fd, static_cast<short>(sending_ ? POLLOUT : POLLIN), 0});
      }
      // In slices, so a clock jump cannot park us for long.
      std::string err = lococomm::poll_once(fds.data(), fds.size(),
                                            static_cast<int>(std::min<int64_t>(left_ms, 100)),
                                            "a heal socket was closed under the executor");
      if (!err.empty()) return err;
    }
  }

 private:
  // iovecs over the current chunk's remaining pieces, from (piece, offset): how many, how
  // many bytes they hold, and whether they reach the end of the chunk.
  struct Gathered {
    int count = 0;
    int64_t bytes = 0;
    bool to_chunk_end = true;
  };
  static Gathered gather(const Stream& s, iovec* iov) {
    Gathered g;
    const int64_t end = s.ends[s.chunk];
    for (int64_t p = s.piece; p < end; ++p) {
      const int64_t skip = p == s.piece ? s.offset : 0;
      if (s.len[p] - skip == 0) continue;
      if (g.count == kMaxIov) {
        g.to_chunk_end = false;
        break;
      }
      iov[g.count].iov_base = s.ptr[p] + skip;
      iov[g.count].iov_len = static_cast<size_t>(s.len[p] - skip);
      g.bytes += s.len[p] - skip;
      ++g.count;
    }
    return g;
  }

  // Hashes up to `budget` more bytes of the stream, never past what a receiver holds (its
  // data cursor); true if it hashed anything.
  bool hash_some(Stream& s, int64_t budget) const {
    bool worked = false;
    const int64_t chunks = static_cast<int64_t>(s.ends.size());
    while (budget > 0 && s.hash_chunk < chunks) {
      const int64_t end = s.ends[s.hash_chunk];
      if (s.hash_piece >= end) {  // chunk complete
        s.chunk_sums.push_back(s.hash.value());
        s.hash = lococomm::ChecksumStream();
        s.hash_chunk++;
        worked = true;
        continue;
      }
      if (s.hash_offset == s.len[s.hash_piece]) {  // an empty piece, or one hashed whole
        s.hash_piece++;
        s.hash_offset = 0;
        continue;
      }
      int64_t limit = s.len[s.hash_piece];
      if (!sending_) {  // only bytes that have arrived
        if (s.hash_chunk > s.chunk || (s.hash_chunk == s.chunk && s.hash_piece > s.piece)) break;
        if (s.hash_chunk == s.chunk && s.hash_piece == s.piece) limit = s.offset;
      }
      const int64_t take = std::min(budget, limit - s.hash_offset);
      if (take <= 0) break;
      s.hash.update(s.ptr[s.hash_piece] + s.hash_offset, take);
      s.hash_offset += take;
      budget -= take;
      worked = true;
    }
    return worked;
  }

  // The checksum of the current chunk, hashing what is left of it first.
  // (Called once the chunk's data is all sent or all here, so the hash can always finish it.)
  uint64_t chunk_sum(Stream& s) const {
    while (static_cast<int64_t>(s.chunk_sums.size()) <= s.chunk) {
      TORCH_CHECK(hash_some(s, INT64_MAX), "heal_stream: checksum cursor stuck (bug)");
    }
    return s.chunk_sums[s.chunk];
  }

  // Moves the data cursor (piece, offset) on by `moved` bytes.
  static void advance(Stream& s, int64_t moved) {
    while (moved > 0) {
      const int64_t take = std::min(moved, s.len[s.piece] - s.offset);
      s.offset += take;
      moved -= take;
      if (s.offset == s.len[s.piece]) {
        s.piece++;
        s.offset = 0;
      }
    }
    // skip empty pieces so that "piece == chunk end" means the chunk's data is complete
    while (s.piece < s.ends[s.chunk] && s.len[s.piece] == 0) s.piece++;
  }

  static void next_chunk(Stream& s) {
    s.chunk++;
    s.in_trailer = false;
    s.trailer_done = 0;
    if (s.chunk < static_cast<int64_t>(s.ends.size())) {
      while (s.piece < s.ends[s.chunk] && s.len[s.piece] == 0) s.piece++;
    }
  }

  static std::string io_error(const char* what, int err) {
    return std::string(what) + " failed: " + std::strerror(err);
  }

  std::string pump_send(Stream& s, bool* progressed) {
    iovec iov[kMaxIov];
    msghdr msg{};
    while (!s.done()) {
      int n = 0;
      bool header = false;
      if (s.header_done < s.header_bytes) {
        iov[0].iov_base = const_cast<uint8_t*>(s.header) + s.header_done;
        iov[0].iov_len = static_cast<size_t>(s.header_bytes - s.header_done);
        n = 1;
        header = true;
      } else if (s.in_trailer) {
        iov[0].iov_base = s.trailer + s.trailer_done;
        iov[0].iov_len = static_cast<size_t>(8 - s.trailer_done);
        n = 1;
      } else {
        n = gather(s, iov).count;
      }
      if (n == 0) {  // the chunk's data is out (or it had none): its checksum follows
        const uint64_t h = chunk_sum(s);
        for (int b = 0; b < 8; ++b) s.trailer[b] = static_cast<uint8_t>(h >> (8 * b));
        s.in_trailer = true;
        continue;
      }
      msg.msg_iov = iov;
      msg.msg_iovlen = static_cast<size_t>(n);
      const ssize_t put = ::sendmsg(s.fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (put < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          // the socket is full: hash ahead meanwhile, then try it again
          if (hash_some(s, kHashSlice)) *progressed = true;
          return "";
        }
        return io_error("send", errno);
      }
      if (put == 0) return "send made no progress";
      *progressed = true;
      if (header) {
        s.header_done += put;
      } else if (s.in_trailer) {
        s.trailer_done += put;
        if (s.trailer_done == 8) next_chunk(s);
      } else {
        advance(s, put);
      }
    }
    return "";
  }

  std::string pump_recv(Stream& s, bool* progressed) {
    iovec iov[kMaxIov + 1];
    msghdr msg{};
    while (!s.done()) {
      int n = 0;
      int64_t room = 0;  // data bytes the iovecs can take (the rest is the trailer's)
      const bool header = s.header_done < s.header_bytes;
      if (header) {
        iov[0].iov_base = s.header_in.data() + s.header_done;
        iov[0].iov_len = static_cast<size_t>(s.header_bytes - s.header_done);
        n = 1;
      } else {
        Gathered g;
        if (!s.in_trailer) g = gather(s, iov);
        n = g.count;
        room = g.bytes;
        if (n == 0) s.in_trailer = true;
        // the trailer rides along with the chunk's last pieces: one call fewer per chunk
        if (g.to_chunk_end) {
          iov[n].iov_base = s.trailer + s.trailer_done;
          iov[n].iov_len = static_cast<size_t>(8 - s.trailer_done);
          ++n;
        }
      }
      msg.msg_iov = iov;
      msg.msg_iovlen = static_cast<size_t>(n);
      const ssize_t got = ::recvmsg(s.fd, &msg, MSG_DONTWAIT);
      if (got < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          // nothing there yet: hash what has arrived meanwhile, then look again
          if (hash_some(s, kHashSlice)) *progressed = true;
          return "";
        }
        return io_error("receive", errno);
      }
      if (got == 0) return "peer closed the connection";
      *progressed = true;
      if (header) {
        s.header_done += got;
        if (s.header_done == s.header_bytes &&
            std::memcmp(s.header_in.data(), s.header, static_cast<size_t>(s.header_bytes)) != 0) {
          return "stream header mismatch (the source's state layout or plan differs)";
        }
        continue;
      }
      const int64_t data = std::min<int64_t>(got, room);
      if (data > 0) {
        advance(s, data);
        if (s.piece >= s.ends[s.chunk]) s.in_trailer = true;
      }
      s.trailer_done += got - data;
      if (s.trailer_done == 8) {
        uint64_t sent = 0;
        for (int b = 0; b < 8; ++b) sent |= static_cast<uint64_t>(s.trailer[b]) << (8 * b);
        if (sent != chunk_sum(s)) {
          return "chunk " + std::to_string(s.chunk) + " arrived corrupted (checksum mismatch)";
        }
        next_chunk(s);
      }
    }
    return "";
  }

  std::vector<Stream>& streams_;
  const bool sending_;
  const int abort_fd_;
};

}  // namespace

// Sends (sending=true) or receives the heal streams; "" on success, else why it stopped (the
// sockets are then out of step). pieces[i] are stream i's byte ranges (contiguous uint8 CPU
// tensors), chunk_ends[i] the piece count at the end of each of its chunks, headers[i] the
// header it sends or expects.
std::string heal_stream(const std::vector<int64_t>& fds,
                        const std::vector<std::vector<at::Tensor>>& pieces,
                        const std::vector<std::vector<int64_t>>& chunk_ends,
                        const std::vector<at::Tensor>& headers, bool sending, int64_t abort_fd,
                        double timeout_seconds) {
  const size_t n = fds.size();
  TORCH_CHECK(pieces.size() == n && chunk_ends.size() == n && headers.size() == n,
              "heal_stream: fds, pieces, chunk_ends and headers must have one entry per stream");
  std::vector<Stream> streams(n);
  for (size_t i = 0; i < n; ++i) {
    Stream& s = streams[i];
    s.fd = static_cast<int>(fds[i]);
    TORCH_CHECK(s.fd >= 0, "heal_stream: stream ", i, " has a negative fd");
    const at::Tensor& h = headers[i];
    TORCH_CHECK(h.device().is_cpu() && h.scalar_type() == at::kByte && h.is_contiguous() && h.numel() > 0,
                "heal_stream: header ", i, " must be a non-empty contiguous uint8 CPU tensor");
    s.header = h.data_ptr<uint8_t>();
    s.header_bytes = h.numel();
    s.header_in.assign(static_cast<size_t>(s.header_bytes), 0);
    for (size_t p = 0; p < pieces[i].size(); ++p) {
      const at::Tensor& t = pieces[i][p];
      TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kByte && t.is_contiguous(),
                  "heal_stream: piece ", p, " of stream ", i, " must be a contiguous uint8 CPU tensor");
      s.ptr.push_back(t.numel() ? t.data_ptr<uint8_t>() : nullptr);
      s.len.push_back(t.numel());
    }
    int64_t previous = 0;
    for (int64_t end : chunk_ends[i]) {
      TORCH_CHECK(end >= previous && end <= static_cast<int64_t>(pieces[i].size()),
                  "heal_stream: chunk_ends of stream ", i, " must be non-decreasing piece counts");
      previous = end;
    }
    TORCH_CHECK(previous == static_cast<int64_t>(pieces[i].size()),
                "heal_stream: the chunks of stream ", i, " must cover all its pieces");
    s.ends = chunk_ends[i];
    if (!s.ends.empty()) {
      while (s.piece < s.ends[0] && s.len[s.piece] == 0) s.piece++;
    }
  }
  Transfer transfer(streams, sending, static_cast<int>(abort_fd));
  pybind11::gil_scoped_release nogil;
  return transfer.run(timeout_seconds);
}
