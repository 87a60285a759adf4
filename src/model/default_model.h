// The model the CLI and tests use when none is named.
#pragma once

namespace cortex::model {

// Path of the default model (SmolLM2-135M-Instruct, Q4_1), relative to the current directory;
// scripts/fetch_model.sh puts it there.
inline constexpr const char* kDefaultModelPath = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

}  // namespace cortex::model
