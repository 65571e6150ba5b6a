// Values derived from a parameter once per version, not on every call: a weight converted to the
// GEMMs' dtype, a depthwise conv weight rearranged into the conv loops' tap layout.
//
// An entry is keyed by what the tensor views (storage, offset, sizes, strides: the model passes a
// 1x1-conv weight as a fresh [D, C] view each call) and a tag naming the derivation; it is valid
// while that storage lives and its version counter (shared by every view of it) is unchanged, so
// an optimizer step, a weight load or a `.data` swap (new storage) is seen at the next call.
// Inference tensors have no version counter and are derived per call. Writes through `p.data`
// bypass the version counter: convnext_fast.clear_prepared() empties this cache too.
//
// Off unless the calling thread turned it on (set_enabled): the Python wrappers do so around a
// call when no gradient is needed and torch.distributed is not initialized (FSDP2 all-gathers
// new values into its parameters' memory with their version counters preserved, which no cache
// keyed on versions can see). Compiled graphs and training calls derive per call.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <mutex>
#include <vector>

namespace convnext_fast {

class DerivedCache {
 public:
  // make(t) for t at its current version, made once. `tag` tells derivations of one tensor apart.
  at::Tensor get(const at::Tensor& t, int64_t tag,
                 const std::function<at::Tensor(const at::Tensor&)>& make) {
    if (!enabled_ || t.is_inference()) return make(t);
    const int64_t version = t._version();
    const Key key{t.storage().unsafeGetStorageImpl(), t.storage_offset(), t.sizes().vec(),
                  t.strides().vec(), tag};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (const Entry& e : entries_) {
        if (e.key == key && e.version == version && !e.storage.expired()) return e.value;
      }
    }
    at::Tensor value = make(t);
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(),
                                  [&](const Entry& e) { return e.key == key || e.storage.expired(); }),
                   entries_.end());
    if (entries_.size() >= kMaxEntries) entries_.clear();
    entries_.push_back({key, c10::weak_intrusive_ptr<c10::StorageImpl>(
                                 t.storage().getWeakStorageImpl()), version, value});
    return value;
  }

  // Turns the cache on or off for the calling thread; returns the previous setting.
  static bool set_enabled(bool on) {
    const bool was = enabled_;
    enabled_ = on;
    return was;
  }

  static bool enabled() { return enabled_; }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.clear();
  }

 private:
  struct Key {
    const c10::StorageImpl* storage;
    int64_t offset;
    std::vector<int64_t> sizes, strides;
    int64_t tag;
    bool operator==(const Key& o) const {
      return storage == o.storage && offset == o.offset && sizes == o.sizes && strides == o.strides &&
             tag == o.tag;
    }
  };
  struct Entry {
    Key key;
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    int64_t version;
    at::Tensor value;
  };
  // Per block: two MLP matrices and a conv weight (two tap layouts with the backward), for the
  // largest model's blocks in two dtypes.
  static constexpr size_t kMaxEntries = 1024;

  static inline thread_local bool enabled_ = false;
  std::mutex mutex_;
  std::vector<Entry> entries_;
};

// The process's one cache (csrc/cpu/derived_cache.cpp).
DerivedCache& derived_cache();

// t in dtype st, contiguous: t itself when it is, else converted once per version.
inline at::Tensor converted_weight(const at::Tensor& t, at::ScalarType st) {
  if (t.scalar_type() == st && t.is_contiguous()) return t.detach();
  return derived_cache().get(t, static_cast<int64_t>(st), [st](const at::Tensor& w) {
    return w.detach().to(st).contiguous();
  });
}

}  // namespace convnext_fast
