// One wait of the native socket executors (ring.cpp, heal_stream.cpp): poll(2) on their
// sockets and the epoch's abort pipe, with Python's signal handlers run on EINTR.
#pragma once

#include <torch/extension.h>

#include <poll.h>

#include <cerrno>
#include <cstring>
#include <string>

namespace lococomm {

// Waits up to `timeout_ms` for any of `fds` (fds[0]: the abort pipe, read end). Returns "" when
// a socket may be ready, the slice passed or a signal arrived (the caller looks again),
// "aborted" when the pipe is readable or closed, else what went wrong (`closed` names a
// socket closed under the executor). A signal runs Python's handlers first (Ctrl-C must not
// wait for the deadline); one that raises (KeyboardInterrupt) ends the call with its
// exception. Only the main thread runs handlers. Call without the GIL.
inline std::string poll_once(pollfd* fds, nfds_t n, int timeout_ms, const char* closed) {
  const int rc = ::poll(fds, n, timeout_ms);
  if (rc < 0 && errno == EINTR) {
    pybind11::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw pybind11::error_already_set();
    return "";
  }
  if (rc < 0) return std::string("poll failed: ") + std::strerror(errno);
  if (rc > 0 && (fds[0].revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL))) return "aborted";
  for (nfds_t i = 1; i < n; ++i) {
    if (fds[i].revents & POLLNVAL) return closed;
  }
  return "";
}

}  // namespace lococomm
