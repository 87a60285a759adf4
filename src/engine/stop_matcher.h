// Stop strings over streamed text: text goes out as soon as it cannot be the start of a stop
// string, so a client never sees part of a stop sequence, and nothing after a stop is emitted.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace cortex::engine {

class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops);

  // Adds newly decoded text; returns the part that is now safe to emit. After a stop string is
  // found, stopped() is true, the returned text ends right before it, and later calls return "".
  std::string push(std::string_view text);
  // The held-back tail at the end of generation (empty once stopped).
  std::string flush();
  bool stopped() const { return stopped_; }
  // The stop string that matched (empty if none).
  const std::string& matched() const { return matched_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;
  bool stopped_ = false;
  std::string matched_;
};

}  // namespace cortex::engine
