// The row blocks of the work partition (work_partition.h).
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "work_partition.h"

namespace rnn_fast::cpu {

std::vector<RowBlock> row_blocks(const StepLayout& layout, int64_t threads) {
  const int64_t B = layout.B;
  const int64_t wanted = std::min(B, std::max<int64_t>(1, (threads + layout.D - 1) / layout.D));
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
  std::vector<RowBlock> blocks;
  for (int64_t d = 0; d < layout.D; ++d) {
    for (const auto& [first, last] : ranges) {
      blocks.push_back({d, first, last});
    }
  }
  return blocks;
}

}  // namespace rnn_fast::cpu
