// Small RAII helpers shared by the benchmark clients.
#pragma once

#include <libnbd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string_view>

namespace bench {

struct Close {
  void operator()(nbd_handle* h) const { nbd_close(h); }
};
using Handle = std::unique_ptr<nbd_handle, Close>;

inline Handle connect(const char* uri) {
  Handle h(nbd_create());
  if (!h) std::abort();
  nbd_add_meta_context(h.get(), LIBNBD_CONTEXT_BASE_ALLOCATION);
  nbd_set_uri_allow_local_file(h.get(), true);  // nbds:// URIs name certificate directories
  if (nbd_connect_uri(h.get(), uri) == -1) {
    std::fprintf(stderr, "connect %s: %s\n", uri, nbd_get_error());
    std::exit(2);
  }
  return h;
}

// Records the first extent of a REQ_ONE reply.
struct FirstExtent {
  uint64_t length = 0;
  uint32_t flags = 0;
  static int callback(void* user, const char* context, uint64_t, uint32_t* entries, size_t n, int*) {
    auto* self = static_cast<FirstExtent*>(user);
    if (n >= 2 && std::string_view(context) == LIBNBD_CONTEXT_BASE_ALLOCATION) {
      self->length = entries[0];
      self->flags = entries[1];
    }
    return 0;
  }
};

inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace bench
