// Command-line driver of the CUDA emulator: runs hf_int8's CUDA launch functions (launch.h) on problems written by
// tests/test_cuda_emulation.py and writes the results next to them, for the test to compare with the reference.
//
//   hf_int8_cuda_emu [--schedule forward|reverse|random] [--seed N] MANIFEST
//
// MANIFEST holds one problem per line: `<op> <dir> key=value ...`; inputs are raw little-endian arrays in <dir>
// (see read_input), outputs are written there. Every buffer is allocated with its exact size (so AddressSanitizer's
// redzone starts right after it); int8 inputs start `offset_a` bytes and float inputs `offset_x` bytes past a
// 64-byte boundary (unaligned views, as a tensor with a storage offset has); outputs start filled with 0xCD bytes,
// so an element a kernel forgets to write is caught by the comparison.
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "hf_int8_emu/runtime.h"
#include "launch.h"

namespace {

using hf_int8::cuda::DType;

struct Buffer {
  void* base = nullptr;
  char* data = nullptr;
  size_t bytes = 0;
  Buffer() = default;
  Buffer(size_t n, size_t offset) : bytes(n) {
    if (posix_memalign(&base, 64, n + offset > 0 ? n + offset : 1) != 0) throw std::runtime_error("out of memory");
    data = static_cast<char*>(base) + offset;
    std::memset(data, 0xCD, n);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : base(o.base), data(o.data), bytes(o.bytes) { o.base = nullptr; }
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(base, o.base);
    data = o.data;
    bytes = o.bytes;
    return *this;
  }
  ~Buffer() { std::free(base); }
};

struct Problem {
  std::string op, dir;
  std::map<std::string, std::string> kv;

  std::string str(const std::string& key) const {
    auto it = kv.find(key);
    if (it == kv.end()) throw std::runtime_error("missing key '" + key + "' in problem " + dir);
    return it->second;
  }
  int64_t i64(const std::string& key) const { return std::stoll(str(key)); }
  int64_t i64(const std::string& key, int64_t fallback) const { return kv.count(key) ? i64(key) : fallback; }
  float f32(const std::string& key) const { return std::strtof(str(key).c_str(), nullptr); }
};

DType dtype_of(const std::string& name) {
  if (name == "f32") return DType::kFloat32;
  if (name == "f16") return DType::kFloat16;
  if (name == "bf16") return DType::kBFloat16;
  throw std::runtime_error("unknown dtype '" + name + "'");
}

size_t dtype_size(DType t) { return t == DType::kFloat32 || t == DType::kInt32 ? 4 : 2; }

Buffer read_input(const Problem& p, const std::string& name, size_t bytes, size_t offset) {
  Buffer b(bytes, offset);
  const std::string path = p.dir + "/" + name + ".bin";
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) throw std::runtime_error("cannot open " + path + ": " + std::strerror(errno));
  const size_t got = bytes > 0 ? std::fread(b.data, 1, bytes, f) : 0;
  std::fclose(f);
  if (got != bytes) throw std::runtime_error(path + ": expected " + std::to_string(bytes) + " bytes");
  return b;
}

void write_output(const Problem& p, const std::string& name, const Buffer& b) {
  const std::string path = p.dir + "/" + name + ".bin";
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) throw std::runtime_error("cannot write " + path);
  if (b.bytes > 0) std::fwrite(b.data, 1, b.bytes, f);
  std::fclose(f);
}

void check(cudaError_t err, const Problem& p) {
  if (err != cudaSuccess) throw std::runtime_error("launch failed with error " + std::to_string(err) + " in " + p.dir);
}

// The split-K scratch launch_int8_gemm asks for (exact size, so a write past it is an AddressSanitizer report; it
// starts as 0xCD bytes, so a launch that forgot to zero it gives wrong sums).
Buffer split_workspace(size_t need, void** ptr, size_t* bytes) {
  Buffer b(need, 0);
  *ptr = need > 0 ? b.data : nullptr;
  *bytes = need;
  return b;
}

// One stdout line per GEMM: how many blocks shared each tile (split-K), so the test can check both paths ran.
void report_splits(const Problem& p, int64_t m, int64_t n, int64_t k, int sm_count) {
  std::printf("splits %s %d\n", p.dir.c_str(), hf_int8::cuda::int8_gemm_splits(m, n, k, sm_count));
}

void run(const Problem& p) {
  const auto offset_a = static_cast<size_t>(p.i64("offset_a", 0));
  const auto offset_x = static_cast<size_t>(p.i64("offset_x", 0));
  const int sm_count = static_cast<int>(p.i64("sm_count", 132));
  if (p.op == "quantize_weight" || p.op == "quantize_activation") {
    const bool weight = p.op == "quantize_weight";
    const int64_t rows = weight ? p.i64("n") : p.i64("m");
    const int64_t k = p.i64("k");
    const DType t = dtype_of(p.str("dtype"));
    Buffer x = read_input(p, weight ? "w" : "x", size_t(rows * k) * dtype_size(t), offset_x);
    Buffer codes(size_t(rows * k), 0), scale(size_t(rows) * 4, 0);
    if (weight) {
      check(hf_int8::cuda::launch_quantize_weight(x.data, t, rows, k, reinterpret_cast<int8_t*>(codes.data),
                                                  reinterpret_cast<float*>(scale.data), nullptr),
            p);
      write_output(p, "scale", scale);
    } else {
      Buffer mask(size_t(k), 0);
      check(hf_int8::cuda::launch_quantize_activation(
                x.data, t, rows, k, p.f32("threshold"), reinterpret_cast<int8_t*>(codes.data),
                reinterpret_cast<float*>(scale.data), reinterpret_cast<bool*>(mask.data), nullptr),
            p);
      write_output(p, "row_scale", scale);
      write_output(p, "mask", mask);
    }
    write_output(p, "codes", codes);
    return;
  }
  const int64_t m = p.i64("m"), n = p.i64("n"), k = p.i64("k");
  if (p.op == "int8_matmul" || p.op == "int8_scaled_matmul") {
    Buffer a = read_input(p, "a", size_t(m * k), offset_a);
    Buffer b = read_input(p, "b", size_t(n * k), offset_a);
    hf_int8::cuda::GemmArgs args;
    args.a = reinterpret_cast<const int8_t*>(a.data);
    args.b = reinterpret_cast<const int8_t*>(b.data);
    args.m = m;
    args.n = n;
    args.k = k;
    args.sm_count = sm_count;
    Buffer row_scale, col_scale, bias;
    DType out_t = DType::kInt32;
    if (p.op == "int8_scaled_matmul") {
      out_t = dtype_of(p.str("out_dtype"));
      row_scale = read_input(p, "row_scale", size_t(m) * 4, 0);
      col_scale = read_input(p, "col_scale", size_t(n) * 4, 0);
      args.row_scale = reinterpret_cast<const float*>(row_scale.data);
      args.col_scale = reinterpret_cast<const float*>(col_scale.data);
      if (p.str("bias") != "none") {
        args.bias_dtype = dtype_of(p.str("bias"));
        bias = read_input(p, "bias", size_t(n) * dtype_size(args.bias_dtype), 0);
        args.bias = bias.data;
      }
    }
    Buffer out(size_t(m * n) * dtype_size(out_t), 0);
    args.out = out.data;
    args.out_dtype = out_t;
    Buffer workspace =
        split_workspace(hf_int8::cuda::int8_gemm_workspace_bytes_for(args), &args.workspace, &args.workspace_bytes);
    report_splits(p, m, n, k, sm_count);
    check(hf_int8::cuda::launch_int8_gemm(args, nullptr), p);
    write_output(p, "out", out);
    return;
  }
  if (p.op == "int8_linear") {
    const DType t = dtype_of(p.str("dtype"));
    Buffer x = read_input(p, "x", size_t(m * k) * dtype_size(t), offset_x);
    Buffer w = read_input(p, "w", size_t(n * k), offset_a);
    Buffer ws = read_input(p, "ws", size_t(n) * 4, 0);
    Buffer bias;
    hf_int8::cuda::LinearArgs args;
    if (p.i64("bias") != 0) {
      bias = read_input(p, "bias", size_t(n) * dtype_size(t), 0);
      args.bias = bias.data;
      args.bias_dtype = t;
    }
    Buffer out(size_t(m * n) * dtype_size(t), 0), codes(size_t(m * k), 0), row_scale(size_t(m) * 4, 0),
        mask(size_t(k), 0);
    args.x = x.data;
    args.x_dtype = t;
    args.m = m;
    args.n = n;
    args.k = k;
    args.weight = reinterpret_cast<const int8_t*>(w.data);
    args.weight_scale = reinterpret_cast<const float*>(ws.data);
    args.threshold = p.f32("threshold");
    args.out = out.data;
    args.codes = reinterpret_cast<int8_t*>(codes.data);
    args.row_scale = reinterpret_cast<float*>(row_scale.data);
    args.mask = reinterpret_cast<bool*>(mask.data);
    args.sm_count = sm_count;
    Buffer workspace =
        split_workspace(hf_int8::cuda::int8_linear_workspace_bytes(args), &args.workspace, &args.workspace_bytes);
    report_splits(p, m, n, k, sm_count);
    check(hf_int8::cuda::launch_int8_linear(args, nullptr), p);
    write_output(p, "out", out);
    return;
  }
  throw std::runtime_error("unknown op '" + p.op + "'");
}

}  // namespace

int main(int argc, char** argv) {
  using hf_int8::emu::Schedule;
  Schedule schedule = Schedule::kForward;
  uint64_t seed = 0;
  const char* manifest = nullptr;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--schedule" && i + 1 < argc) {
      const std::string s = argv[++i];
      schedule = s == "reverse" ? Schedule::kReverse : s == "random" ? Schedule::kRandom : Schedule::kForward;
      if (s != "forward" && s != "reverse" && s != "random") {
        std::fprintf(stderr, "unknown schedule '%s'\n", s.c_str());
        return 2;
      }
    } else if (arg == "--seed" && i + 1 < argc) {
      seed = std::strtoull(argv[++i], nullptr, 10);
    } else {
      manifest = argv[i];
    }
  }
  if (manifest == nullptr) {
    std::fprintf(stderr, "usage: %s [--schedule forward|reverse|random] [--seed N] MANIFEST\n", argv[0]);
    return 2;
  }
  hf_int8::emu::set_schedule(schedule, seed);
  FILE* f = std::fopen(manifest, "r");
  if (f == nullptr) {
    std::fprintf(stderr, "cannot open %s\n", manifest);
    return 2;
  }
  char line[4096];
  int done = 0;
  try {
    while (std::fgets(line, sizeof(line), f) != nullptr) {
      std::istringstream in(line);
      Problem p;
      if (!(in >> p.op >> p.dir)) continue;
      std::string item;
      while (in >> item) {
        const size_t eq = item.find('=');
        if (eq == std::string::npos) throw std::runtime_error("bad item '" + item + "'");
        p.kv[item.substr(0, eq)] = item.substr(eq + 1);
      }
      run(p);
      ++done;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hf_int8_cuda_emu: %s\n", e.what());
    std::fclose(f);
    return 2;
  }
  std::fclose(f);
  const auto& st = hf_int8::emu::stats();
  std::printf("problems=%d blocks=%llu threads=%llu switches=%llu barriers=%llu collectives=%llu\n", done,
              static_cast<unsigned long long>(st.blocks), static_cast<unsigned long long>(st.threads),
              static_cast<unsigned long long>(st.switches), static_cast<unsigned long long>(st.barriers),
              static_cast<unsigned long long>(st.collectives));
  return 0;
}
