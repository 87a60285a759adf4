// The model the CLI and tests use when none is named.
#pragma once

namespace cortex::model {

// File name of the default model (SmolLM2-135M-Instruct, Q4_1); scripts/fetch_model.sh puts it in
// the checkout's models/ folder and in the per-user models folder (cli/model_options.h says where
// the CLI looks for it).
inline constexpr const char* kDefaultModelFile = "SmolLM2-135M-Instruct.Q4_1.gguf";
// Where it is relative to the checkout.
inline constexpr const char* kDefaultModelPath = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

}  // namespace cortex::model
