// The Jinja interpreter (src/model/jinja.h): constructs against outputs of Python's jinja2 3.1 in
// transformers' chat template environment, error messages, which bytes count as template text,
// limits, and robustness on mutated templates.
#include <gtest/gtest.h>

#include <chrono>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/jinja.h"

namespace {

using cortex::model::jinja::ByteRange;
using cortex::model::jinja::Limits;
using cortex::model::jinja::Rendered;
using cortex::model::jinja::Template;
using cortex::model::jinja::TemplateError;
using Json = nlohmann::ordered_json;

std::string render(const std::string& source, const Json& context = Json::object()) {
  return Template(source).render(context).text;
}

// The message of the TemplateError that compiling and rendering `source` throws ("" if none).
std::string errorOf(const std::string& source, const Json& context = Json::object()) {
  try {
    Template(source).render(context);
  } catch (const TemplateError& e) {
    return e.what();
  }
  return "";
}

struct Case {
  const char* name;
  const char* source;
  const char* context;  // JSON
  const char* expected;
};

// Expected outputs are what jinja2 3.1.6 renders (ImmutableSandboxedEnvironment, trim_blocks,
// lstrip_blocks, loopcontrols, transformers' tojson).
const Case kCases[] = {
    {"TrimBlocks",
     "{% if true %}\nA\n{% endif %}\nB\n",
     "{}",
     "A\nB"},
    {"LstripBlocks",
     "x\n    {% if true %}\n    y\n    {% endif %}\nz",
     "{}",
     "x\n    y\nz"},
    {"DashStrips",
     "a   {{- 'b' -}}   c\n  {%- if true -%}  d  {%- endif %}",
     "{}",
     "abcd"},
    {"PlusKeeps",
     "x\n    {%+ if true %}y{% endif +%}\nz",
     "{}",
     "x\n    y\nz"},
    {"Comments",
     "a {# note #}\n  {# own line #}\nb{#- strip -#}  c",
     "{}",
     "a bc"},
    {"Raw",
     "{% raw %}{{ not evaluated }}{% endraw %}!",
     "{}",
     "{{ not evaluated }}!"},
    {"CrLf",
     "a\r\nb{% if true %}\r\nc{% endif %}\r\n",
     "{}",
     "a\nbc"},
    {"Literals",
     "{{ 1 }} {{ -2.5 }} {{ 1e3 }} {{ 'a\\'b\\n' }} {{ \"q\" }} {{ [1, 'x', none, True] }} {{ {'k': [1, 2], 'j': {'x': false}} }} {{ (1, 2) }} {{ () }} {{ (1,) }}",
     "{}",
     "1 -2.5 1000.0 a'b\n q [1, 'x', None, True] {'k': [1, 2], 'j': {'x': False}} (1, 2) () (1,)"},
    {"Arithmetic",
     "{{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 2 ** 10 }} {{ 1 + 2 * 3 }} {{ (1 + 2) * 3 }} {{ 0.1 + 0.2 }} {{ 10 / 4 * 2 }} {{ 1e20 * 10 }} {{ 1 / 3 }}",
     "{}",
     "3 -4 1 2 3.5 1024 7 9 0.30000000000000004 5.0 1e+21 0.3333333333333333"},
    {"Concat",
     "{{ 'a' ~ 1 ~ none ~ true ~ [1] }} {{ 'ab' * 3 }} {{ [1] + [2] }} {{ 'x' + 'y' }}",
     "{}",
     "a1NoneTrue[1] ababab [1, 2] xy"},
    {"Comparisons",
     "{{ 1 < 2 < 3 }} {{ 'a' < 'b' }} {{ 1 == 1.0 }} {{ true == 1 }} {{ [1,2] == [1,2] }} {{ 'b' in 'abc' }} {{ 2 not in [1, 3] }} {{ 'k' in {'k': 1} }} {{ none is none }} {{ 1 != 2 }}",
     "{}",
     "True True True True True True True True True True"},
    {"BooleanOps",
     "{{ 0 or 'x' }} {{ 'a' and 'b' }} {{ not [] }} {{ none or [] }} {{ '' and 1 }} {{ 1 if false }}|{{ 'y' if 0 else 'n' }}",
     "{}",
     "x b True []  |n"},
    {"Subscripts",
     "{{ m['role'] }} {{ m.role }} {{ xs[0] }} {{ xs[-1] }} {{ xs[1:] }} {{ xs[::-1] }} {{ xs[:2] }} {{ 'hello'[1:3] }} {{ 'h\xc3\xa9llo'[::-1] }} {{ xs.1 }} {{ m.missing }}|{{ xs[10] }}|",
     "{\"m\": {\"role\": \"user\"}, \"xs\": [1, 2, 3]}",
     "user user 1 3 [2, 3] [3, 2, 1] [1, 2] el oll\xc3\xa9h 2 ||"},
    {"StringMethods",
     "{{ '  a b  '.strip() }}|{{ 'xxaxx'.strip('x') }}|{{ '  a'.lstrip() }}|{{ 'a  '.rstrip() }}|{{ 'a,b,,c'.split(',') }}|{{ ' a  b '.split() }}|{{ 'a b c'.split(' ', 1) }}|{{ 'a b c'.rsplit(' ', 1) }}|{{ 'abc'.startswith('ab') }}|{{ 'abc'.endswith(('x', 'c')) }}|{{ 'Hi'.upper() }}{{ 'Hi'.lower() }}|{{ 'hello world'.title() }}|{{ 'hELLO'.capitalize() }}|{{ 'aXbX'.replace('X', '-') }}|{{ 'abcb'.find('b') }}{{ 'abcb'.rfind('b') }}{{ 'abc'.find('z') }}|{{ 'a-b'.count('-') }}|{{ '-'.join(['a', 'b']) }}|{{ '{} and {name}'.format(1, name='n') }}|{{ 'a\\nb\\r\\nc'.splitlines() }}|{{ '12'.isdigit() }}",
     "{}",
     "a b|a|a|a|['a', 'b', '', 'c']|['a', 'b']|['a', 'b c']|['a b', 'c']|True|True|HIhi|Hello World|Hello|a-b-|13-1|1|a-b|1 and n|['a', 'b', 'c']|True"},
    {"DictMethods",
     "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{{ d.keys() | list }}{{ d.values() | list }}{{ d.get('a') }}{{ d.get('z', 'dflt') }}{{ d.get('z') }}",
     "{\"d\": {\"a\": 1, \"b\": [2]}}",
     "a=1;b=[2];['a', 'b'][1, [2]]1dfltNone"},
    {"Filters1",
     "{{ '  x  ' | trim }}|{{ 'abc' | length }}|{{ [1, 2] | count }}|{{ 'ab' | upper }}{{ 'AB' | lower }}|{{ 'hello-world foo' | title }}|{{ 'hELLO' | capitalize }}|{{ 'aaa' | replace('a', 'b', 2) }}|{{ [1, 2, 3] | join(', ') }}|{{ u | default('d') }}|{{ '' | default('e', true) }}|{{ none | default('f') }}|{{ 3 | string }}|{{ '42' | int }}{{ '4.7' | int }}{{ 'x' | int }}{{ 3.9 | int }}|{{ 'ab' | list }}|{{ [3, 1] | first }}{{ [3, 1] | last }}|{{ 'h\xc3\xa9llo' | length }}",
     "{}",
     "x|3|2|ABab|Hello-World Foo|Hello|bba|1, 2, 3|d|e|None|3|42403|['a', 'b']|31|5"},
    {"Filters2",
     "{{ users | selectattr('active') | map(attribute='name') | join(',') }}|{{ users | rejectattr('active') | map(attribute='name') | list }}|{{ users | selectattr('name', 'equalto', 'b') | list | length }}|{{ [1, 2, 3, 4] | select('odd') | list }}|{{ [1, 2, 3] | reject('even') | list }}|{{ ['a', 'b'] | map('upper') | list }}|{{ d | dictsort }}|{{ d | items | list }}|{{ [3, 1, 2] | sort }}|{{ [3, 1, 2] | sort(reverse=true) }}|{{ users | sort(attribute='name', reverse=true) | map(attribute='name') | join }}|{{ [1, 1, 2] | unique | list }}|{{ [1, 5, 2] | max }}{{ [4, 2] | min }}|{{ [1, 2, 3] | sum }}|{{ [1, 2] | reverse | list }}|{{ -3 | abs }}|{{ 2.567 | round(2) }}|{{ 'a<b>&' | escape }}|{{ 'one two three' | wordcount }}",
     "{\"users\": [{\"name\": \"a\", \"active\": true}, {\"name\": \"b\", \"active\": false}, {\"name\": \"c\", \"active\": true}], \"d\": {\"b\": 1, \"A\": 2}}",
     "a,c|['b']|1|[1, 3]|[1, 3]|['A', 'B']|[('A', 2), ('b', 1)]|[('b', 1), ('A', 2)]|[1, 2, 3]|[3, 2, 1]|cba|[1, 2]|52|6|[2, 1]|3|2.57|a&lt;b&gt;&amp;|3"},
    {"Indent",
     "{{ 'a\\nb\\n\\nc' | indent(2) }}|{{ 'a\\nb' | indent(4, first=true) }}|{{ 'a\\n\\nb' | indent('> ', blank=true) }}",
     "{}",
     "a\n  b\n\n  c|    a\n    b|a\n> \n> b"},
    {"ToJson",
     "{{ v | tojson }}|{{ v | tojson(indent=2) }}|{{ v | tojson(separators=(',', ':')) }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}|{{ '\xc3\xa9\"\\n' | tojson }}|{{ '\xc3\xa9' | tojson(ensure_ascii=true) }}|{{ 1.0 | tojson }}|{{ [] | tojson(indent=2) }}",
     "{\"v\": {\"s\": \"x\", \"n\": [1, 2.5, null, true], \"e\": {}}}",
     "{\"s\": \"x\", \"n\": [1, 2.5, null, true], \"e\": {}}|{\n  \"s\": \"x\",\n  \"n\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"e\": {}\n}|{\"s\":\"x\",\"n\":[1,2.5,null,true],\"e\":{}}|{\"a\": 2, \"b\": 1}|\"\xc3\xa9\\\"\\n\"|\"\\u00e9\"|1.0|[]"},
    {"Tests",
     "{{ x is defined }}{{ y is defined }}{{ y is undefined }}{{ none is none }}{{ 's' is string }}{{ {} is mapping }}{{ [] is iterable }}{{ 's' is sequence }}{{ 1 is number }}{{ 1.5 is float }}{{ 1 is integer }}{{ true is true }}{{ false is false }}{{ true is boolean }}{{ 3 is odd }}{{ 4 is even }}{{ 9 is divisibleby 3 }}{{ 'a' is eq 'a' }}{{ 1 is equalto 2 }}{{ 2 is in [1, 2] }}{{ 'ab' is lower }}{{ x is not none }}{{ 2 is gt 1 }}{{ range is callable }}",
     "{\"x\": 1}",
     "TrueFalseTrueTrueTrueTrueTrueTrueTrueTrueTrueTrueTrueTrueTrueTrueTrueTrueFalseTrueTrueTrueTrueTrue"},
    {"IfElif",
     "{% for n in [1, 2, 3] %}{% if n == 1 %}one{% elif n == 2 %}two{% else %}many{% endif %} {% endfor %}",
     "{}",
     "one two many "},
    {"LoopVars",
     "{% for x in 'abc' %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ loop.cycle('o', 'e') }}{{ loop.previtem }}{{ loop.nextitem }};{% endfor %}",
     "{}",
     "1032TrueFalse3ob;2121FalseFalse3eac;3210FalseTrue3ob;"},
    {"LoopFilterElse",
     "{% for x in xs if x > 1 %}{{ x }}{{ loop.length }};{% else %}none{% endfor %}|{% for x in [] %}x{% else %}empty{% endfor %}",
     "{\"xs\": [1, 2, 3]}",
     "22;32;|empty"},
    {"LoopControls",
     "{% for x in range(10) %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 5 %}{% break %}{% endif %}{{ x }}{% endfor %}",
     "{}",
     "0134"},
    {"LoopDict",
     "{% for k in d %}{{ k }}{% endfor %}|{% for k, v in d | dictsort %}{{ k }}{{ v }}{% endfor %}|{% for a, b in [[1, 2], [3, 4]] %}{{ a + b }}{% endfor %}",
     "{\"d\": {\"z\": 1, \"a\": 2}}",
     "za|a2z1|37"},
    {"Scoping",
     "{% set x = 1 %}{% for i in [1, 2] %}{% set x = x + i %}{{ x }}{% endfor %}{{ x }}|{% set ns = namespace(total=0, seen=[]) %}{% for i in [1, 2, 3] %}{% set ns.total = ns.total + i %}{% endfor %}{{ ns.total }}|{% if true %}{% set y = 'in-if' %}{% endif %}{{ y }}",
     "{}",
     "231|6|in-if"},
    {"SetForms",
     "{% set a, b = 1, 2 %}{{ a }}{{ b }}|{% set t = 1, 2 %}{{ t }}|{% set block %}inner {{ a }}{% endset %}{{ block }}|{% set up | upper %}shout{% endset %}{{ up }}",
     "{}",
     "12|(1, 2)|inner 1|SHOUT"},
    {"Macros",
     "{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('a') }} {{ greet('b', '?') }} {{ greet(name='c', punct='.') }}|{% macro wrap() %}[{{ caller() }}]{% endmacro %}{% call wrap() %}body{% endcall %}|{% macro rec(n) %}{{ n }}{% if n > 0 %}{{ rec(n - 1) }}{% endif %}{% endmacro %}{{ rec(3) }}",
     "{}",
     "Hi a! Hi b? Hi c.|[body]|3210"},
    {"FilterBlock",
     "{% filter upper %}abc {{ 'd' }}{% endfilter %}",
     "{}",
     "ABC D"},
    {"Undefined",
     "[{{ missing }}][{{ missing | length }}][{% for x in missing %}x{% endfor %}][{{ missing is defined }}][{{ not missing }}][{{ missing == missing }}][{{ obj.nope }}][{{ none.attr }}]",
     "{\"obj\": {}}",
     "[][0][][False][True][True][][]"},
    {"Markup",
     "{{ 'a'|safe + '<b>' }}|{{ '<x>' ~ 'y'|safe }}|{{ ('<'|safe + '&'|e) }}",
     "{}",
     "a&lt;b&gt;|<x>y|<&amp;"},
    {"Generators",
     "{{ xs | map('upper') | list | length }}|{% if xs | select('none') %}truthy{% endif %}|{{ (xs | reverse | list)[0] }}",
     "{\"xs\": [\"a\", \"b\"]}",
     "2|truthy|b"},
    {"IntKeys",
     "{% set m = {0: 'zero', 512: 'big', none: 'n'} %}{{ m[512] }}{{ m[0] }}{{ m[none] }}{{ 512 in m }}{{ m | tojson }}",
     "{}",
     "bigzeronTrue{\"0\": \"zero\", \"512\": \"big\", \"null\": \"n\"}"},
    {"StringIter",
     "{% for ch in 'h\xc3\xa9!' %}[{{ ch }}]{% endfor %}{{ 'abc' | reverse }}",
     "{}",
     "[h][\xc3\xa9][!]cba"},
};

TEST(Jinja, RendersLikeJinja2) {
  for (const Case& c : kCases) {
    SCOPED_TRACE(c.name);
    std::string got;
    try {
      got = render(c.source, Json::parse(c.context));
    } catch (const std::exception& e) {
      got = std::string("error: ") + e.what();
    }
    EXPECT_EQ(got, c.expected);
  }
}

TEST(Jinja, ErrorsNameTheLine) {
  EXPECT_EQ(errorOf("line one\n{{ 1 + }}"), "line 2: syntax error: unexpected end of print statement");
  EXPECT_NE(errorOf("a\nb\n{% if x %}\nno end").find("line 4: syntax error: unexpected end of template; "
                                                       "looking for 'elif', 'else', 'endif' to close "
                                                       "the block opened on line 3"),
            std::string::npos)
      << errorOf("a\nb\n{% if x %}\nno end");
  EXPECT_EQ(errorOf("\n\n{{ raise_exception('Roles must alternate') }}"),
            "line 3: the template raised an error: Roles must alternate");
  // An unknown filter fails when the template is compiled, as in jinja2...
  EXPECT_EQ(errorOf("ok\n{{ x | frobnicate }}"), "line 2: syntax error: no filter named 'frobnicate'");
  EXPECT_EQ(errorOf("{{ x is frobnicated }}"), "line 1: syntax error: no test named 'frobnicated'");
  // ...except inside an if, where only using it fails.
  EXPECT_EQ(render("{% if false %}{{ x | frobnicate }}{% endif %}ok"), "ok");
  EXPECT_EQ(errorOf("{% if true %}\n{{ x | frobnicate }}{% endif %}"), "line 2: No filter named 'frobnicate'");
  EXPECT_EQ(errorOf("{% for %}"), "line 1: syntax error: expected a name, got end of statement block");
  EXPECT_EQ(errorOf("{% frob %}"), "line 1: syntax error: unknown or unsupported statement 'frob'");
  EXPECT_EQ(errorOf("{% include 'x' %}"), "line 1: syntax error: unknown or unsupported statement 'include'");
  EXPECT_EQ(errorOf("{{ 'abc"), "line 1: syntax error: unterminated string");
  EXPECT_EQ(errorOf("{# never closed"), "line 1: syntax error: missing end of comment tag");
  EXPECT_EQ(errorOf("{{ (1 }}"), "line 1: syntax error: unexpected '}'");
  // Undefined values: printing is fine, using one is not.
  EXPECT_EQ(errorOf("\n{{ missing.attr }}"), "line 2: 'missing' is undefined");
  EXPECT_EQ(errorOf("{{ m.content.strip() }}", {{"m", Json::object()}}),
            "line 1: 'dict object' has no attribute 'content'");
  EXPECT_EQ(errorOf("{{ missing + 1 }}"), "line 1: 'missing' is undefined");
  EXPECT_EQ(errorOf("{{ 'a' + 1 }}"), "line 1: unsupported operand type(s) for +: 'str' and 'int'");
  EXPECT_EQ(errorOf("{{ 1 // 0 }}"), "line 1: integer division or modulo by zero");
  EXPECT_EQ(errorOf("{{ 1 < 'a' }}"), "line 1: '<' not supported between instances of 'int' and 'str'");
  EXPECT_EQ(errorOf("{% for x in 3 %}{% endfor %}"), "line 1: 'int' object is not iterable");
  // The sandbox refuses to change values.
  EXPECT_EQ(errorOf("{% set xs = [] %}{{ xs.append(1) }}"),
            "line 1: access to attribute 'append' of 'list' object is unsafe");
  EXPECT_EQ(errorOf("{{ x | map('upper') | length }}", {{"x", Json::array({"a"})}}),
            "line 1: object of type 'generator' has no len()");
  EXPECT_EQ(errorOf("{% set x = 1 %}{% set x.y = 2 %}"), "line 1: cannot assign attribute on non-namespace object");
  EXPECT_NE(errorOf("{{ x }}", Json::array()).find("must be a JSON object"), std::string::npos);
}

TEST(Jinja, StrftimeNow) {
  const std::string year = render("{{ strftime_now('%Y') }}");
  ASSERT_EQ(year.size(), 4u);
  EXPECT_GE(std::stoi(year), 2024);
}

// Which bytes the template wrote: literal text and string literals are, values are not, and a
// value's bytes stay untrusted through concatenation, methods and filters.
TEST(Jinja, TemplateRanges) {
  const Json ctx = {{"content", "<|im_end|>x"}, {"bos_token", "<s>"}};
  const Rendered r = Template("A{{ '<|im_start|>' + content + '<|im_end|>' }}B").render(ctx);
  EXPECT_EQ(r.text, "A<|im_start|><|im_end|>x<|im_end|>B");
  EXPECT_EQ(r.templateRanges, (std::vector<ByteRange>{{0, 13}, {24, 35}}));

  // Trusted variables count as template text.
  const std::string names[] = {"bos_token"};
  const Rendered b = Template("{{ bos_token }}{{ content }}").render(ctx, names);
  EXPECT_EQ(b.templateRanges, (std::vector<ByteRange>{{0, 3}}));

  // Slices, strip, replace and macros keep provenance byte for byte.
  const Rendered s = Template("{% macro m(x) %}[{{ x | trim }}]{% endmacro %}{{ m('  lit  ') }}"
                              "{{ m(content) }}{{ ('ab' ~ content)[1:4] }}{{ content.replace('x', 'Y') }}")
                         .render(ctx);
  EXPECT_EQ(s.text, "[lit][<|im_end|>x]b<|<|im_end|>Y");
  EXPECT_EQ(s.templateRanges, (std::vector<ByteRange>{{0, 6}, {17, 19}, {31, 32}}));

  // Message text that spells a control token never becomes template text.
  const Json msgs = {{"messages", Json::array({{{"role", "user"}, {"content", "<end_of_turn>"}}})}};
  const Rendered g =
      Template("{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content | trim }}<end_of_turn>\n{% endfor %}")
          .render(msgs);
  EXPECT_EQ(g.text, "<start_of_turn>user\n<end_of_turn><end_of_turn>\n");
  EXPECT_EQ(g.templateRanges, (std::vector<ByteRange>{{0, 15}, {19, 20}, {33, 47}}));
}

TEST(Jinja, Limits) {
  Limits small;
  small.maxSteps = 100'000;
  small.maxOutputBytes = 1 << 16;
  small.maxCallDepth = 16;
  auto failsWith = [&small](const std::string& source, const std::string& needle) {
    try {
      Template(source).render(Json::object(), {}, small);
      ADD_FAILURE() << "rendered: " << source;
    } catch (const TemplateError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  failsWith("{% for a in range(1000) %}{% for b in range(1000) %}{% endfor %}{% endfor %}", "steps");
  failsWith("{% for a in range(2000) %}{{ 'x' * 100 }}{% endfor %}", "output larger than");
  failsWith("{{ 'x' * 100000000 }}", "larger than");
  failsWith("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "nested deeper than 16");
  failsWith("{{ range(200000) | length }}", "range too big");
  failsWith("{% set ns = namespace(x=[]) %}{% for i in range(5000) %}{% set ns.x = [ns.x] %}{% endfor %}",
            "nested deeper");
  // Deep nesting in the source is a syntax error, not a crash.
  EXPECT_NE(errorOf("{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}").find("too deep"),
            std::string::npos);
  std::string chain = "{{ 1";
  for (int k = 0; k < 5000; ++k) chain += " + 1";
  EXPECT_NE(errorOf(chain + " }}").find("nested too deeply"), std::string::npos);
  std::string ifs;
  for (int k = 0; k < 2000; ++k) ifs += "{% if true %}";
  EXPECT_NE(errorOf(ifs).find("too deep"), std::string::npos);
  // A namespace holding itself prints and frees without trouble.
  EXPECT_NE(errorOf("{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}").find("nested"), std::string::npos);
}

// Mutated templates: every one either renders or fails with a TemplateError, within bounds.
TEST(Jinja, MutatedTemplatesNeverCrash) {
  const std::vector<std::string> seeds = {
      "{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}"
      "{{ '<|im_start|>system\\nDefault<|im_end|>\\n' }}{%- endif %}{{ '<|im_start|>' + "
      "message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}{%- endfor %}"
      "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}",
      "{% set ns = namespace(n=0, s='') %}{% macro m(x, y=2) %}{{ x * y }}{{ caller() if caller is defined }}"
      "{% endmacro %}{% for k, v in {'a': 1, 'b': [1, 2]} | dictsort %}{% set ns.n = ns.n + loop.index %}"
      "{{ k ~ (v | tojson) }}{% call m(ns.n) %}c{% endcall %}{% endfor %}{{ messages | selectattr('role', "
      "'equalto', 'user') | map(attribute='content') | join('|') }}{{ 'a,b'.split(',')[::-1] }}",
      "{% for m in messages if m.content is string %}{% if m.role == 'user' %}{{ m.content[0:5] | upper }}"
      "{% elif m.role is defined %}{{ range(3) | list }}{% else %}{% break %}{% endif %}{% endfor %}"
      "{% set x %}{{ 1 if true else 2 }}{% endset %}{{ x ~ (2 ** 3) ~ (7 // 2) ~ (none is none) }}{# c #}",
  };
  const std::vector<std::string> pieces = {
      "{{", "}}", "{%", "%}", "{#", "#}", "-", "+", "(", ")", "[", "]", "{", "}", "'", "\"", "|",
      ".", ",", ":", "=", " if ", " else ", " for ", " in ", " endfor ", " endif ", " set ", "loop",
      "macro", "endmacro", "caller()", "namespace(", "range(99999)", "*", "**", "~", "\\", "\n",
      "messages", "ns", "x", "0", "-1", "1e308", "9999999999999999999", "\xff", "\xe2\x82"};
  std::mt19937 rng(12345);
  Limits limits;
  limits.maxSteps = 200'000;
  limits.maxOutputBytes = 1 << 18;
  limits.maxCallDepth = 32;
  const Json ctx = {{"messages", Json::array({{{"role", "system"}, {"content", "be brief"}},
                                              {{"role", "user"}, {"content", " Hi <|im_end|> "}}})},
                    {"add_generation_prompt", true}};
  const auto start = std::chrono::steady_clock::now();
  int rendered = 0, failed = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    std::string t = seeds[static_cast<size_t>(iter) % seeds.size()];
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits && !t.empty(); ++e) {
      const size_t at = rng() % (t.size() + 1);
      switch (rng() % 4) {
        case 0: t.insert(at, pieces[rng() % pieces.size()]); break;
        case 1: t.erase(at, 1 + rng() % 8); break;
        case 2: {  // duplicate a span
          const size_t len = std::min<size_t>(1 + rng() % 40, t.size() - std::min(at, t.size()));
          t.insert(at, t.substr(std::min(at, t.size()), len));
          break;
        }
        default: if (at < t.size()) t[at] = static_cast<char>(rng() % 256);
      }
    }
    try {
      Template(t).render(ctx, {}, limits);
      ++rendered;
    } catch (const TemplateError& e) {
      ++failed;
      EXPECT_EQ(std::string(e.what()).rfind("line ", 0), 0u) << e.what();
    }
  }
  EXPECT_GT(rendered, 100);
  EXPECT_GT(failed, 100);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(20));
}

}  // namespace
