// Errors of the model component (GGUF files, weights, tokenizer, forward pass). One exception type
// so callers at the edge (CLI, server) can tell "this model is unusable" from other failures.
#pragma once

#include <stdexcept>
#include <string>

namespace cortex::model {

// Thrown when a model file or its contents cannot be used. The message says what was wrong and
// where (file, byte offset, metadata key or tensor name) and, when there is one, what to do.
class ModelError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace cortex::model
