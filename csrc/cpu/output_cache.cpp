// The cache of output blocks (output_cache.h).
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/native/TensorFactories.h>

#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "output_cache.h"

namespace rnn_fast::cpu {

namespace {

class OutputBlockCache final : public c10::Allocator {
 public:
  static constexpr size_t kMinBlockBytes = size_t(1) << 20;
  static constexpr size_t kMaxCachedBytes = size_t(2) << 30;

  static OutputBlockCache& instance() {
    // Never destroyed: tensors holding its blocks may outlive static destruction.
    static auto* cache = new OutputBlockCache();
    return *cache;
  }

  c10::DataPtr allocate(size_t nbytes) override {
    void* data = take(nbytes);
    if (data == nullptr) {
      data = map_new(nbytes);
    }
    return {data, new Block{data, nbytes}, &OutputBlockCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Gives every unused block back to the system; returns how many bytes that was.
  int64_t release_unused() {
    std::list<Block> unused;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      unused.swap(unused_);
      by_size_.clear();
      unused_bytes_ = 0;
    }
    int64_t released = 0;
    for (const Block& block : unused) {
      std::free(block.data);
      released += static_cast<int64_t>(block.nbytes);
    }
    return released;
  }

 private:
  struct Block {
    void* data;
    size_t nbytes;
  };
  static constexpr size_t kHugePage = size_t(2) << 20;

  void* take(size_t nbytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = by_size_.find(nbytes);
    if (found == by_size_.end()) {
      return nullptr;
    }
    void* data = found->second->data;
    unused_.erase(found->second);
    by_size_.erase(found);
    unused_bytes_ -= nbytes;
    return data;
  }

  static void* map_new(size_t nbytes) {
    const size_t rounded = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = std::aligned_alloc(kHugePage, rounded);
    TORCH_CHECK(data != nullptr, "rnn_fast: out of memory allocating ", nbytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(data, rounded, MADV_HUGEPAGE);  // advice only: if declined, the pages are simply 4 KiB
#endif
    return data;
  }

  static void release(void* context) {
    std::unique_ptr<Block> block(static_cast<Block*>(context));
    OutputBlockCache& cache = instance();
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(cache.mutex_);
      cache.unused_.push_front(*block);
      cache.by_size_.emplace(block->nbytes, cache.unused_.begin());
      cache.unused_bytes_ += block->nbytes;
      while (cache.unused_bytes_ > kMaxCachedBytes) {
        const Block oldest = cache.unused_.back();
        auto [first, last] = cache.by_size_.equal_range(oldest.nbytes);
        for (auto entry = first; entry != last; ++entry) {
          if (entry->second == std::prev(cache.unused_.end())) {
            cache.by_size_.erase(entry);
            break;
          }
        }
        cache.unused_.pop_back();
        cache.unused_bytes_ -= oldest.nbytes;
        evicted.push_back(oldest.data);
      }
    }
    for (void* data : evicted) {
      std::free(data);
    }
  }

  std::mutex mutex_;
  std::list<Block> unused_;  // most recently freed first
  std::unordered_multimap<size_t, std::list<Block>::iterator> by_size_;
  size_t unused_bytes_ = 0;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t nbytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
  if (nbytes < OutputBlockCache::kMinBlockBytes) {
    return at::empty(sizes, options);
  }
  at::Tensor output = at::detail::empty_generic(sizes, &OutputBlockCache::instance(),
                                                c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                options.dtype().toScalarType(), std::nullopt);
  // A cached block holds an earlier tensor's values: poison it as at::empty would in deterministic mode.
  if (at::globalContext().deterministicAlgorithms() && at::globalContext().deterministicFillUninitializedMemory()) {
    at::native::fill_empty_deterministic_(output);
  }
  return output;
}

int64_t release_cached_blocks() { return OutputBlockCache::instance().release_unused(); }

}  // namespace rnn_fast::cpu
