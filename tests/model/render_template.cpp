// render_template: renders Jinja templates with our interpreter, for comparison with jinja2.
//
//   render_template TEMPLATE_FILE < context.json     prints the rendered text (exit 1 on error,
//                                                    the message on stderr)
//   render_template --batch < jobs.json              jobs: [{"template": "...", "context": {...}}]
//                                                    prints [{"output": "..."} | {"error": "..."}]
//   --ranges (either mode) adds the template-written byte ranges: in batch mode a "ranges" member,
//   otherwise lines "begin end" on stderr.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "model/jinja.h"

namespace {

using cortex::model::jinja::Rendered;
using cortex::model::jinja::Template;
using Json = nlohmann::ordered_json;

Json rangesJson(const Rendered& r) {
  Json out = Json::array();
  for (const auto& range : r.templateRanges) out.push_back(Json::array({range.begin, range.end}));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  bool batch = false, ranges = false;
  std::string file;
  for (int k = 1; k < argc; ++k) {
    const std::string arg = argv[k];
    if (arg == "--batch") batch = true;
    else if (arg == "--ranges") ranges = true;
    else file = arg;
  }
  if (!batch && file.empty()) {
    std::cerr << "usage: render_template TEMPLATE_FILE < context.json | --batch < jobs.json\n";
    return 2;
  }
  std::ostringstream input;
  input << std::cin.rdbuf();
  Json in;
  try {
    in = Json::parse(input.str());
  } catch (const std::exception& e) {
    std::cerr << "bad JSON on stdin: " << e.what() << "\n";
    return 2;
  }
  if (batch) {
    Json results = Json::array();
    for (const Json& job : in) {
      Json r = Json::object();
      try {
        const Template t(job.at("template").get<std::string>());
        const Rendered out = t.render(job.at("context"));
        r["output"] = out.text;
        if (ranges) r["ranges"] = rangesJson(out);
      } catch (const std::exception& e) {
        r["error"] = e.what();
      }
      results.push_back(std::move(r));
    }
    // Invalid UTF-8 in output is replaced rather than rejected.
    std::cout << results.dump(-1, ' ', false, Json::error_handler_t::replace) << "\n";
    return 0;
  }
  std::ifstream f(file, std::ios::binary);
  if (!f) {
    std::cerr << file << ": cannot read\n";
    return 2;
  }
  std::ostringstream source;
  source << f.rdbuf();
  try {
    const Template t(source.str());
    const Rendered out = t.render(in);
    std::fwrite(out.text.data(), 1, out.text.size(), stdout);
    if (ranges) {
      for (const auto& range : out.templateRanges) std::cerr << range.begin << " " << range.end << "\n";
    }
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return 1;
  }
  return 0;
}
