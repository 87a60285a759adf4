// The KV cache's one error mechanism: every failing call throws KVError and leaves the cache as
// it was before the call (no partial allocation, no half-updated block table).
#pragma once

#include <stdexcept>
#include <string>

namespace cortex::kv {

enum class KVErrc {
  InvalidArgument,    // a count <= 0, a bad configuration, a position out of range
  UnknownSequence,    // the sequence id was never allocated or was freed
  SequenceExists,     // allocateFor/fork onto an id already in use
  LayerOutOfRange,    // layer not in [0, numLayers)
  OutOfBlocks,        // the pool has too few free blocks for the request
  InvariantViolated,  // checkInvariants found corrupted bookkeeping (a bug, not a user error)
};

const char* toString(KVErrc code);

class KVError : public std::runtime_error {
 public:
  KVError(KVErrc code, const std::string& message)
      : std::runtime_error(std::string(toString(code)) + ": " + message), code_(code) {}
  KVErrc code() const { return code_; }

 private:
  KVErrc code_;
};

}  // namespace cortex::kv
