// cortexstream: the command-line entry point. Subcommands live in cmd_*.cpp.
#include <exception>
#include <iostream>

#include "cli/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"CortexStream: LLM inference runtime with a paged KV cache"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "cortexstream 0.1.0");

  CLI::App* bench = app.add_subcommand("bench", "Benchmarks (print JSON)");
  bench->require_subcommand(1);
  cortex::cli::registerBenchKvCommands(*bench);
  cortex::cli::registerBenchBatchedCommand(*bench);
  cortex::cli::registerTokenizeCommand(app);
  cortex::cli::registerInspectCommand(app);
  cortex::cli::registerGenerateCommands(app);
  cortex::cli::registerPerplexityCommand(app);
  cortex::cli::registerServeCommand(app);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
