// StopMatcher: no partial stop string is ever emitted, nothing after a stop.
#include "engine/stop_matcher.h"

#include <gtest/gtest.h>

namespace cortex::engine {
namespace {

TEST(StopMatcher, PassesTextThroughWithoutStops) {
  StopMatcher m({});
  EXPECT_EQ(m.push("hello"), "hello");
  EXPECT_EQ(m.flush(), "");
}

TEST(StopMatcher, HoldsBackAPossibleStopPrefix) {
  StopMatcher m({"</end>"});
  EXPECT_EQ(m.push("abc</"), "abc");
  EXPECT_EQ(m.push("e"), "");
  EXPECT_EQ(m.push("x"), "</ex");  // not a stop after all
  EXPECT_FALSE(m.stopped());
  EXPECT_EQ(m.push("tail</en"), "tail");
  EXPECT_EQ(m.flush(), "</en");  // generation ended: the held text was real output
}

TEST(StopMatcher, StopsAcrossPiecesAndDropsTheRest) {
  StopMatcher m({"STOP", "\n\n"});
  EXPECT_EQ(m.push("one S"), "one ");
  EXPECT_EQ(m.push("TO"), "");
  EXPECT_EQ(m.push("P and more"), "");
  EXPECT_TRUE(m.stopped());
  EXPECT_EQ(m.matched(), "STOP");
  EXPECT_EQ(m.push("later"), "");
  EXPECT_EQ(m.flush(), "");
}

TEST(StopMatcher, EarliestStopWins) {
  StopMatcher m({"cd", "b"});
  EXPECT_EQ(m.push("abcd"), "a");
  EXPECT_EQ(m.matched(), "b");
}

TEST(StopMatcher, EmptyStopStringsAreIgnored) {
  StopMatcher m({""});
  EXPECT_EQ(m.push("x"), "x");
  EXPECT_FALSE(m.stopped());
}

}  // namespace
}  // namespace cortex::engine
