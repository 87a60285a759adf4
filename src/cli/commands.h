// Subcommands of the `cortexstream` executable. Each registers itself on the app and runs from
// its callback; a failure is reported by throwing (main prints it and exits 1).
#pragma once

#include <CLI/CLI.hpp>

namespace cortex::cli {

// `bench kv` and `bench kv-sim`: KV cache micro-benchmarks and the serving simulation.
void registerBenchKvCommands(CLI::App& bench);

// `bench batched`: prefill and decode tokens/s of N sequences decoded together on one engine,
// for each N of --npl (like llama.cpp's llama-batched-bench).
void registerBenchBatchedCommand(CLI::App& bench);

// `tokenize [--model M] TEXT [--no-special]`: prints the token ids of TEXT as a JSON array.
void registerTokenizeCommand(CLI::App& app);

// `inspect MODEL [--json] [--max-items N]`: a GGUF file's header, metadata and tensor table.
void registerInspectCommand(CLI::App& app);

// `generate` and `chat`: running the model from the command line.
void registerGenerateCommands(CLI::App& app);

// `perplexity --file F [--ctx N] [--method native|llama.cpp]`: how well the model predicts a text
// file, scored on the engine; prints one JSON object.
void registerPerplexityCommand(CLI::App& app);

// `serve`: the OpenAI-compatible HTTP server (docs/server.md).
void registerServeCommand(CLI::App& app);

}  // namespace cortex::cli
