// moetrain_attention_dump: our causal attention forward (and backward) on given inputs, for
// comparisons with other implementations (scripts/attention_vs_torch.py, run by
// scripts/gpu_check.sh).
//   moetrain_attention_dump BACKEND BATCH SEQ HEADS KV_HEADS HEAD_DIM QKV_IN OUT ITERS
//                           [DOUT_IN DQKV_OUT]
// BACKEND: cpu, cuda-fp32 or cuda-bf16. QKV_IN holds the fused qkv rows (float32, native byte
// order, [BATCH*SEQ, (HEADS + 2*KV_HEADS) * HEAD_DIM], the layout of AttentionShape); OUT receives
// the output [BATCH*SEQ, HEADS * HEAD_DIM] of the first forward. With DOUT_IN (the output's
// gradient, OUT's layout), DQKV_OUT receives the backward's dqkv (QKV_IN's layout). Then ITERS
// more forwards (and backwards) are timed (wall clock, each run to completion), and one JSON line
// is printed: {"backend", "ms_per_forward", "ms_per_backward" (0 without DOUT_IN), "iters",
// "smax"}.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moetrain/cpu_backend.hpp"
#include "moetrain/cuda_backend.hpp"

namespace {

using moetrain::AttentionShape;
using moetrain::Backend;

std::unique_ptr<Backend<float>> make_backend(const std::string& name) {
  if (name == "cpu") return std::make_unique<moetrain::CpuBackend<float>>();
  if (name == "cuda-fp32" || name == "cuda-bf16") {
    moetrain::CudaBackendOptions o;
    o.bf16 = name == "cuda-bf16";
    return moetrain::make_cuda_backend(o);
  }
  throw std::runtime_error("unknown backend '" + name + "' (cpu, cuda-fp32, cuda-bf16)");
}

std::vector<float> read_floats(const std::string& path, std::size_t n) {
  std::ifstream in(path, std::ios::binary);
  std::vector<float> v(n);
  if (!in.read(reinterpret_cast<char*>(v.data()), std::streamsize(n * sizeof(float))) ||
      in.peek() != std::ifstream::traits_type::eof())
    throw std::runtime_error(path + ": expected exactly " + std::to_string(n) + " float32 values");
  return v;
}

int run(int argc, char** argv) {
  if (argc != 10 && argc != 12) {
    std::fprintf(stderr,
                 "usage: %s BACKEND BATCH SEQ HEADS KV_HEADS HEAD_DIM QKV_IN OUT ITERS "
                 "[DOUT_IN DQKV_OUT]\n",
                 argv[0]);
    return 2;
  }
  const bool backward = argc == 12;
  const AttentionShape s{std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]),
                         std::atoi(argv[5]), std::atoi(argv[6])};
  const int iters = std::atoi(argv[9]);
  if (s.batch <= 0 || s.seq <= 0 || s.n_heads <= 0 || s.n_kv_heads <= 0 || s.head_dim <= 0 ||
      s.n_heads % s.n_kv_heads != 0 || iters < 0)
    throw std::runtime_error("bad shape or ITERS");
  const auto be = make_backend(argv[1]);
  const std::size_t in_n = std::size_t(s.rows()) * s.qkv_width();
  const std::size_t out_n = std::size_t(s.rows()) * s.out_width();
  const std::vector<float> qkv = read_floats(argv[7], in_n);

  moetrain::DeviceBuffer<float, float> d_qkv(*be, in_n), d_out(*be, out_n),
      d_saved(*be, be->attention_saved_elems(s)), d_smax(*be, std::size_t(s.n_heads));
  be->upload(d_qkv.get(), qkv.data(), in_n * sizeof(float));
  be->attention_forward(d_out.get(), d_saved.get(), d_smax.get(), d_qkv.get(), s);
  std::vector<float> out(out_n), smax(std::size_t(s.n_heads));
  be->download(out.data(), d_out.get(), out_n * sizeof(float));  // waits for the GPU
  be->download(smax.data(), d_smax.get(), smax.size() * sizeof(float));
  {
    std::ofstream f(argv[8], std::ios::binary);
    if (!f.write(reinterpret_cast<const char*>(out.data()), std::streamsize(out_n * sizeof(float))))
      throw std::runtime_error(std::string(argv[8]) + ": write failed");
  }

  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i)
    be->attention_forward(d_out.get(), d_saved.get(), d_smax.get(), d_qkv.get(), s);
  float last = 0;
  be->download(&last, d_out.get(), sizeof last);  // the timed forwards have finished
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  double backward_seconds = 0;
  if (backward) {
    const std::vector<float> dout = read_floats(argv[10], out_n);
    moetrain::DeviceBuffer<float, float> d_dout(*be, out_n), d_dqkv(*be, in_n);
    be->upload(d_dout.get(), dout.data(), out_n * sizeof(float));
    be->attention_backward(d_dqkv.get(), d_dout.get(), d_qkv.get(), d_out.get(), d_saved.get(), s);
    std::vector<float> dqkv(in_n);
    be->download(dqkv.data(), d_dqkv.get(), in_n * sizeof(float));
    std::ofstream f(argv[11], std::ios::binary);
    if (!f.write(reinterpret_cast<const char*>(dqkv.data()), std::streamsize(in_n * sizeof(float))))
      throw std::runtime_error(std::string(argv[11]) + ": write failed");
    const auto b0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i)
      be->attention_backward(d_dqkv.get(), d_dout.get(), d_qkv.get(), d_out.get(), d_saved.get(),
                             s);
    be->download(&last, d_dqkv.get(), sizeof last);
    backward_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - b0).count();
  }
  const nlohmann::json r = {{"backend", be->name()},
                            {"iters", iters},
                            {"ms_per_forward", iters > 0 ? seconds / iters * 1e3 : 0.0},
                            {"ms_per_backward", iters > 0 ? backward_seconds / iters * 1e3 : 0.0},
                            {"smax", smax}};
  std::printf("%s\n", r.dump().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moetrain_attention_dump: %s\n", e.what());
    return 1;
  }
}
