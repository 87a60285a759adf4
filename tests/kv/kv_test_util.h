// Helpers shared by the KV cache tests.
#pragma once

#include <gtest/gtest.h>

#include <vector>

#include "kv/block_pool.h"
#include "kv/kv_error.h"

namespace cortex::kv::testing {

using Ids = std::vector<BlockId>;

// The KVErrc that fn() throws; a test failure if it throws nothing.
KVErrc errcOf(auto&& fn) {
  try {
    fn();
  } catch (const KVError& e) {
    return e.code();
  }
  ADD_FAILURE() << "expected a KVError";
  return KVErrc::InvariantViolated;
}

}  // namespace cortex::kv::testing
