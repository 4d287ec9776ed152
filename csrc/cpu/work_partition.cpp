// The work partition's rule and items (work_partition.h).
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "work_partition.h"

namespace rnn_fast::cpu {

namespace {

// The rule, measured on the shapes of benchmarks/test_lstm_cpu_shapes.py (AMD EPYC Zen 4, 2 threads): the threads of
// a direction split its units when w_hh is far beyond a core's L2 cache (H >= 512: 4 MiB) and each would otherwise
// run few rows, so that the step is bound by reading w_hh rather than by the multiply-adds (H = 1024, B = 8: 2.1x
// faster than splitting rows; H = 256, B = 64 is 1.3x slower); and when there are fewer rows than threads, which
// would idle.
constexpr int64_t kUnitSplitMinHidden = 512;
constexpr int64_t kUnitSplitMaxRowsPerThread = 16;
// Units per thread come in multiples of this: one cache line of fp32, whole vectors for the elementwise pass.
constexpr int64_t kUnitGrain = 16;

std::vector<std::pair<int64_t, int64_t>> row_ranges(const StepLayout& layout, int64_t wanted) {
  const int64_t B = layout.B;
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) {
    total += layout.row_steps(b);
  }
  std::vector<std::pair<int64_t, int64_t>> ranges;
  int64_t begin = 0, done = 0;
  for (int64_t k = 1; k <= wanted && begin < B; ++k) {
    // The k-th share of the row-steps, in integers that cannot overflow (total <= T * B < 2^62).
    const int64_t target = total / wanted * k + total % wanted * k / wanted;
    int64_t end = begin;
    while (end < B && (end == begin || done < target || k == wanted)) {
      done += layout.row_steps(end);
      ++end;
    }
    ranges.emplace_back(begin, end);
    begin = end;
  }
  return ranges;
}

}  // namespace

Split choose_split(const StepLayout& layout, int64_t H, int64_t threads) {
  if (const char* forced = std::getenv("RNN_FAST_CPU_SPLIT"); forced != nullptr && *forced != '\0') {
    const std::string value(forced);
    TORCH_CHECK(value == "rows" || value == "units", "RNN_FAST_CPU_SPLIT must be \"rows\" or \"units\", got \"",
                value, "\"");
    return value == "rows" ? Split::kRows : Split::kUnits;
  }
  if (threads < 2 || H < 2 * kUnitGrain) {
    return Split::kRows;
  }
  const bool idle_threads = layout.B * layout.D < threads;
  const bool bound_by_weights = H >= kUnitSplitMinHidden && layout.B <= kUnitSplitMaxRowsPerThread * threads;
  return idle_threads || bound_by_weights ? Split::kUnits : Split::kRows;
}

std::vector<WorkItem> work_items(const StepLayout& layout, int64_t H, int64_t threads, Split split) {
  std::vector<WorkItem> items;
  const int64_t per_direction = threads / layout.D;
  const int64_t grains = (H + kUnitGrain - 1) / kUnitGrain;
  const bool in_turn = per_direction < 2;
  const int64_t crew = std::min(in_turn ? threads : per_direction, grains);
  if (split == Split::kUnits && crew > 1) {
    for (int64_t d = 0; d < layout.D; ++d) {
      for (int64_t k = 0; k < crew; ++k) {
        const int64_t first = std::min(H, grains * k / crew * kUnitGrain);
        const int64_t last = std::min(H, grains * (k + 1) / crew * kUnitGrain);
        items.push_back({d, 0, layout.B, first, last, crew, in_turn ? d : 0, {}});
      }
    }
    return items;
  }
  const int64_t wanted = std::min(layout.B, std::max<int64_t>(1, (threads + layout.D - 1) / layout.D));
  const auto ranges = row_ranges(layout, wanted);
  for (int64_t d = 0; d < layout.D; ++d) {
    for (const auto& [first, last] : ranges) {
      items.push_back({d, first, last, 0, H, 1, 0, {}});
    }
  }
  return items;
}

}  // namespace rnn_fast::cpu
