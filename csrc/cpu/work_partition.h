// Work partition. Batch rows never interact in an LSTM, so the threads split a direction's rows into blocks, and a
// thread that owns a block runs it for all T steps without waiting for anyone. That makes every thread read the
// direction's whole w_hh at every step, which is free while w_hh sits in the core's cache, but at a large hidden
// size (16 H^2 bytes: 4 MiB at H = 512) and a small batch the step is bound by those reads, and a batch of one row
// leaves all threads but one idle. There the threads of a direction form a crew: all of them run the same rows, each
// for its own share of the hidden units (its columns of every gate), so each reads only its share of w_hh; they
// meet at a barrier after every step, since the next step reads every unit of h.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "blas.h"
#include "step_layout.h"
#include "streamed_gemm.h"

namespace rnn_fast::cpu {

// One thread's work: rows [begin, end) of a direction, hidden units [unit_begin, unit_end) of each gate. crew:
// how many threads share the rows (1: this thread owns all units and never waits). round: the items of round r run
// after those of round r-1 (a crew of all threads per direction, one direction after the other).
struct WorkItem {
  int64_t direction, begin, end, unit_begin, unit_end, crew, round;
  GemmChoice gemm;  // read with the plan, outside the parallel region

  int64_t rows() const { return end - begin; }
  int64_t units() const { return unit_end - unit_begin; }
};

enum class Split { kRows, kUnits };

// The split the threads use for a layout of hidden size H: RNN_FAST_CPU_SPLIT ("rows" or "units") when set,
// else the rule measured by benchmarks/test_lstm_cpu_shapes.py (work_partition.cpp).
Split choose_split(const StepLayout& layout, int64_t H, int64_t threads);

// Each thread's item. Split::kRows: about threads / D blocks of rows per direction, each with about the same
// number of row-steps to run (in packed order the rows are sorted by length, and equal numbers of rows would leave
// the thread of the short rows idle once they end). Split::kUnits: one crew per direction, the units cut into
// multiples of 16 (one cache line of fp32) as evenly as they go; with fewer than two threads per direction, each
// direction in turn gets a crew of every thread (its weights alone then share the cache).
std::vector<WorkItem> work_items(const StepLayout& layout, int64_t H, int64_t threads, Split split);

// Makes the threads of a crew wait for each other; does nothing for an item that is its own crew. All items of a
// partition have crews alike, so every thread of the team reaches each barrier.
inline void crew_barrier(const WorkItem& item) {
  if (item.crew > 1) {
#pragma omp barrier
  }
}

// The items of this call: the split choose_split picks for the current number of threads.
inline std::vector<WorkItem> plan_work(const StepLayout& layout, int64_t H) {
  const int64_t threads = at::get_num_threads();
  std::vector<WorkItem> items = work_items(layout, H, threads, choose_split(layout, H, threads));
  const GemmChoice gemm = gemm_choice();
  for (WorkItem& item : items) {
    item.gemm = gemm;
  }
  return items;
}

inline bool has_crews(const std::vector<WorkItem>& items) { return !items.empty() && items.front().crew > 1; }

// Runs body(WorkItem) for every item, each on a thread of its own; without an OpenMP region when one thread does
// all.
template <typename Body>
void for_each_work_item(const std::vector<WorkItem>& items, const Body& body) {
  for (auto first = items.begin(); first != items.end();) {
    const auto last = std::find_if(first, items.end(), [&](const WorkItem& item) { return item.round != first->round; });
    const int64_t num_items = last - first;
    const int64_t team = std::min<int64_t>(at::get_num_threads(), num_items);
    if (team <= 1) {
      const SequentialBlas sequential;
      std::for_each(first, last, body);
    } else {
      // A round's crews have no more items than threads, so each of its threads runs exactly one.
      const WorkItem* round = &*first;
#pragma omp parallel for num_threads(team) schedule(static, 1)
      for (int64_t index = 0; index < num_items; ++index) {
        body(round[index]);
      }
    }
    first = last;
  }
}

// The columns of the gate pre-activations [rows, 4H] that an item owns: units [begin, begin + count) of each of
// the four gates, one block of 4H columns when it owns all units.
struct GateColumns {
  int64_t begin, count, hidden;

  explicit GateColumns(const WorkItem& item, int64_t H) : begin(item.unit_begin), count(item.units()), hidden(H) {}
  GateColumns(int64_t begin, int64_t count, int64_t hidden) : begin(begin), count(count), hidden(hidden) {}

  bool whole() const { return count == hidden; }
  int64_t blocks() const { return whole() ? 1 : 4; }
  int64_t block_offset(int64_t block) const { return block * hidden + begin; }
  int64_t block_width() const { return whole() ? 4 * hidden : count; }

  // Copies the owned columns of `rows` rows (stride ld in both).
  template <typename scalar_t>
  void copy(const scalar_t* from, scalar_t* to, int64_t rows, int64_t ld) const {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t block = 0; block < blocks(); ++block) {
        const scalar_t* source = from + r * ld + block_offset(block);
        std::copy(source, source + block_width(), to + r * ld + block_offset(block));
      }
    }
  }

  template <typename scalar_t>
  void fill(scalar_t* rows_data, int64_t rows, int64_t ld, scalar_t value) const {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t block = 0; block < blocks(); ++block) {
        scalar_t* start = rows_data + r * ld + block_offset(block);
        std::fill(start, start + block_width(), value);
      }
    }
  }
};

// Per-thread buffers of at least `count` elements, kept across calls: slot 0 for the inference pass's
// pre-activations, slot 1 for the chunks of xw the whole-stack inference projects.
template <typename scalar_t>
scalar_t* thread_scratch(size_t count, int slot = 0) {
  thread_local std::array<std::vector<scalar_t>, 2> buffers;
  std::vector<scalar_t>& buffer = buffers[slot];
  if (buffer.size() < count) {
    buffer.resize(count);
  }
  return buffer.data();
}

}  // namespace rnn_fast::cpu
