#include "kernels/isa.h"

#include <cstdlib>
#include <stdexcept>
#include <string>

namespace cortex::kernels {

namespace {
constexpr Isa kAll[] = {Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni};

Isa chooseIsa() {
  const char* env = std::getenv("CORTEXSTREAM_ISA");
  if (env == nullptr || *env == '\0') return supportedIsas().back();
  const std::optional<Isa> isa = parseIsa(env);
  if (!isa) {
    throw std::runtime_error(std::string("CORTEXSTREAM_ISA='") + env +
                             "' is not a kernel level (scalar, avx2, avx-vnni, avx512-vnni)");
  }
  if (!cpuSupports(*isa)) {
    throw std::runtime_error(std::string("CORTEXSTREAM_ISA=") + env +
                             ": this CPU does not support it (best level: " +
                             toString(supportedIsas().back()) + ")");
  }
  return *isa;
}
}  // namespace

const char* toString(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::Avx2: return "avx2";
    case Isa::AvxVnni: return "avx-vnni";
    case Isa::Avx512Vnni: return "avx512-vnni";
  }
  return "?";
}

std::optional<Isa> parseIsa(std::string_view name) {
  for (Isa isa : kAll) {
    if (name == toString(isa)) return isa;
  }
  return std::nullopt;
}

bool cpuSupports(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  // note: libgcc's feature bits include the XGETBV check that the OS saves the AVX and AVX-512
  // register state, so a supported bit is safe to use.
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  switch (isa) {
    case Isa::Scalar: return true;
    case Isa::Avx2: return avx2;
    case Isa::AvxVnni: return avx2 && __builtin_cpu_supports("avxvnni");
    case Isa::Avx512Vnni:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vnni");
  }
  return false;
#else
  return isa == Isa::Scalar;
#endif
}

std::vector<Isa> supportedIsas() {
  std::vector<Isa> out;
  for (Isa isa : kAll) {
    if (cpuSupports(isa)) out.push_back(isa);
  }
  return out;
}

Isa activeIsa() {
  static const Isa isa = chooseIsa();
  return isa;
}

}  // namespace cortex::kernels
