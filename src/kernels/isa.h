// Instruction-set levels of the CPU kernels, and which one this process runs.
//
// One binary carries every kernel set (each compiled for its own level, see CMakeLists.txt) and
// picks one when the first kernel runs: the best level the CPU and the operating system support,
// unless the environment variable CORTEXSTREAM_ISA names another (scalar, avx2, avx-vnni,
// avx512-vnni), so that tests and benchmarks can run every path the machine has.
#pragma once

#include <optional>
#include <string_view>
#include <vector>

namespace cortex::kernels {

// Levels in increasing order; each one includes the ones below it.
//   Scalar:     portable C++, no vector extensions assumed.
//   Avx2:       AVX2 + FMA + F16C (integer dot products with vpmaddubsw + vpmaddwd).
//   AvxVnni:    Avx2 + AVX-VNNI (vpdpbusd on 256-bit registers).
//   Avx512Vnni: Avx2 + AVX-512 F/BW/VL/DQ + AVX512-VNNI (vpdpbusd on 512-bit registers).
enum class Isa { Scalar, Avx2, AvxVnni, Avx512Vnni };

// "scalar", "avx2", "avx-vnni", "avx512-vnni".
const char* toString(Isa isa);
// The inverse of toString; nullopt for anything else.
std::optional<Isa> parseIsa(std::string_view name);

// Whether this CPU (and the OS, for the AVX-512 register state) can run `isa`.
bool cpuSupports(Isa isa);
// Every level cpuSupports, lowest first (Scalar is always there).
std::vector<Isa> supportedIsas();

// The level this process uses: CORTEXSTREAM_ISA when set, otherwise the best supported one.
// Decided on the first call and fixed for the life of the process. Throws std::runtime_error
// naming the problem when CORTEXSTREAM_ISA is not a level name or names one the CPU lacks.
Isa activeIsa();

}  // namespace cortex::kernels
