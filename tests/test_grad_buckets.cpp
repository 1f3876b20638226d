// ZeRO-1's gradient buckets (docs/design.md §5.2), as pieces: the model's backward reports each
// stage once that stage's gradients are final; the plan cuts the tensors into buckets in that order
// and lays out every bucket's AdamW pieces and owners' matrices as documented; its reduce-scatters
// start as the stages complete and deliver each rank exactly its own gradients. The collectives
// are a recording communicator here; tests/test_distributed.cpp runs the real ones (MPI, NCCL).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstring>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "gradcheck.hpp"
#include "moetrain/communicator.hpp"
#include "moetrain/cpu_backend.hpp"
#include "moetrain/model.hpp"
#include "moetrain/param_layout.hpp"
#include "moetrain/rng.hpp"
#include "optim/zero1.hpp"
#include "test_util.hpp"

using namespace moetrain;
using namespace moetrain::test;

namespace {

// Rank `rank` of `world` ranks that all hold the same gradients: a reduce-scatter's sum is world
// times the rank's own block. Records every start, and whether it came before finish_started.
class RecordingComm final : public Communicator {
 public:
  RecordingComm(int rank, int world) : rank_(rank), world_(world) {}
  int rank() const override { return rank_; }
  int world() const override { return world_; }
  const char* name() const override { return "recording"; }
  void all_reduce(void*, std::size_t, DType, ReduceOp) override {}
  void reduce_scatter(const void*, void*, std::size_t, DType, ReduceOp) override {
    FAIL("the gradient buckets use started reduce-scatters only");
  }
  void reduce_scatter_start(const void* send, void* recv, std::size_t count, DType type,
                            ReduceOp op) override {
    REQUIRE(type == DType::F32);
    REQUIRE(op == ReduceOp::Sum);
    const float* s = static_cast<const float*>(send) + std::size_t(rank_) * count;
    float* r = static_cast<float*>(recv);
    for (std::size_t i = 0; i < count; ++i) r[i] = float(world_) * s[i];
    starts.push_back(count);
  }
  void progress() override { ++progress_calls; }
  void finish_started() override { finished_after = starts.size(); }
  void all_gather(const void*, void*, std::size_t, DType) override {}
  void broadcast(void*, std::size_t, int) override {}
  void barrier() override {}
  void reduce_host(double*, std::size_t, double*, std::size_t) override {}

  std::vector<std::size_t> starts;  // element counts, in start order
  std::size_t progress_calls = 0, finished_after = 0;

 private:
  int rank_, world_;
};

Config bucket_config(double bucket_mib, OptimizerName name = OptimizerName::MuonClip) {
  Config c = tiny_config({.vocab = 23, .d_model = 16, .layers = 3, .seq = 5});
  c.optim.name = name;
  c.train.grad_bucket_mib = bucket_mib;
  return c;
}

}  // namespace

TEST_CASE("model backward reports each stage once its gradients are final", "[buckets]") {
  for (const bool tied : {false, true}) {
    INFO("tied embeddings " << tied);
    ModelConfig cfg = tiny_model({.vocab = 19, .d_model = 12, .layers = 3, .seq = 6});
    cfg.tie_embeddings = tied;
    CpuBackend<float> be;
    Model<float> m(cfg, be, 2);
    m.init_weights(3);
    const ParamLayout& layout = m.layout();
    Rng rng(5);
    std::vector<std::int32_t> tok(12), tgt(12);
    for (auto& t : tok) t = std::int32_t(rng.below(19));
    for (auto& t : tgt) t = std::int32_t(rng.below(19));

    // At each report, a copy of every gradient that stage completes (the CPU backend's buffers
    // are host memory, written by the time each op returns).
    std::vector<int> stages;
    std::map<std::string, std::vector<float>> at_report;
    m.zero_grads();
    m.forward_backward_async(tok.data(), tgt.data(), 1.0, 0, [&](int stage) {
      stages.push_back(stage);
      for (const ParamTensor& t : layout.tensors())
        if (grad_ready_stage(t, cfg.n_layers) == stage)
          at_report[t.name].assign(m.grads() + t.offset, m.grads() + t.offset + t.numel);
    });
    std::vector<int> want(std::size_t(cfg.n_layers) + 1);
    for (std::size_t s = 0; s < want.size(); ++s) want[s] = int(s);
    CHECK(stages == want);
    REQUIRE(at_report.size() == layout.tensors().size());
    double norm = 0;
    for (const ParamTensor& t : layout.tensors()) {
      INFO(t.name);
      const std::vector<float> final_grad(m.grads() + t.offset, m.grads() + t.offset + t.numel);
      CHECK(at_report.at(t.name) == final_grad);
      for (float g : final_grad) norm += double(g) * g;
    }
    CHECK(norm > 0);  // the gradients were there to compare
  }
}

TEST_CASE("the plan cuts backward's order into buckets and lays them out as documented",
          "[buckets]") {
  for (const OptimizerName name : {OptimizerName::MuonClip, OptimizerName::AdamW})
    for (const int world : {1, 2, 3}) {
      INFO("optimizer " << int(name) << ", world " << world);
      // 1 KiB buckets: 256 floats, smaller than some tensors and larger than others.
      const Config cfg = bucket_config(1.0 / 1024, name);
      const ParamLayout layout(cfg.model);
      CpuBackend<float> be;
      RecordingComm comm(world - 1, world);
      const Zero1Plan<float> plan(cfg, layout, be, comm, name != OptimizerName::AdamW);
      const std::size_t cap = 256;
      const auto& buckets = plan.buckets();
      REQUIRE(buckets.size() > 3);

      // Every tensor once, in order of grad_ready_stage (layout order within a stage).
      std::map<std::size_t, const ParamTensor*> by_offset;
      for (const ParamTensor& t : layout.tensors()) by_offset[t.offset] = &t;
      std::vector<const ParamTensor*> seen;
      std::size_t flat = 0, shard = 0, part = 0, own_state = 0;
      int stage = 0;
      for (const GradBucket& b : buckets) {
        std::vector<const ParamTensor*> in;
        for (std::size_t i : b.entries) in.push_back(by_offset.at(plan.adamw()[i].offset));
        for (std::size_t i : b.mats) in.push_back(by_offset.at(plan.matrices()[i].offset));
        // Backward's order: by stage, then layout order (tensors() is a vector).
        std::sort(in.begin(), in.end(), [&](const ParamTensor* x, const ParamTensor* y) {
          const int sx = grad_ready_stage(*x, cfg.model.n_layers),
                    sy = grad_ready_stage(*y, cfg.model.n_layers);
          return sx != sy ? sx < sy : x < y;
        });
        std::size_t elems = 0, largest = 0, adamw = 0;
        for (const ParamTensor* t : in) {
          elems += t->numel;
          largest = std::max(largest, t->numel);
          CHECK(grad_ready_stage(*t, cfg.model.n_layers) <= b.ready_stage);
        }
        // A bucket closes at the first tensor that reaches the cap.
        CHECK(elems - largest < cap);
        CHECK((elems >= cap || &b == &buckets.back()));
        CHECK(b.ready_stage >= stage);
        stage = b.ready_stage;
        seen.insert(seen.end(), in.begin(), in.end());

        // AdamW: packed tensors, world pieces; this rank's piece at the running shard offset.
        for (std::size_t i : b.entries) {
          const AdamWEntry& e = plan.adamw()[i];
          CHECK(e.flat >= b.flat);
          CHECK(e.flat + e.numel <= b.flat + b.piece * std::size_t(world));
          adamw += e.numel;
        }
        CHECK(b.piece == (adamw + std::size_t(world) - 1) / std::size_t(world));
        CHECK(b.flat == flat);
        CHECK(b.shard_offset == shard);
        flat += b.piece * std::size_t(world);
        shard += b.piece;
        // Matrices: disjoint slots of each owner inside the bucket's part, the part as large as
        // the fullest owner's.
        std::vector<std::size_t> fill(std::size_t(world), 0);
        for (std::size_t i : b.mats) {
          const OwnedMatrix& mt = plan.matrices()[i];
          REQUIRE(mt.owner >= 0);
          REQUIRE(mt.owner < world);
          CHECK(mt.slot == b.part_offset + fill[std::size_t(mt.owner)]);
          fill[std::size_t(mt.owner)] += mt.elems();
        }
        // The owner's state: its matrices packed without padding, in bucket order.
        for (std::size_t i : b.mats) {
          const OwnedMatrix& mt = plan.matrices()[i];
          if (!plan.owns(mt)) continue;
          CHECK(mt.state == own_state);
          own_state += mt.elems();
        }
        CHECK(b.part_offset == part);
        CHECK(b.part == *std::max_element(fill.begin(), fill.end()));
        part += b.part;
      }
      CHECK(shard == plan.shard());
      CHECK(own_state == plan.own_elems());
      REQUIRE(seen.size() == layout.tensors().size());
      std::vector<const ParamTensor*> want;
      for (const ParamTensor& t : layout.tensors()) want.push_back(&t);
      std::stable_sort(want.begin(), want.end(), [&](const ParamTensor* a, const ParamTensor* b) {
        return grad_ready_stage(*a, cfg.model.n_layers) < grad_ready_stage(*b, cfg.model.n_layers);
      });
      CHECK(seen == want);

      // Newton-Schulz work balanced: the loads differ by at most the costliest matrix.
      if (name != OptimizerName::AdamW) {
        std::vector<double> load(std::size_t(world), 0.0);
        double costliest = 0;
        for (const OwnedMatrix& mt : plan.matrices()) {
          load[std::size_t(mt.owner)] += ns_cost(mt.rows, mt.cols);
          costliest = std::max(costliest, ns_cost(mt.rows, mt.cols));
        }
        const auto [lo, hi] = std::minmax_element(load.begin(), load.end());
        CHECK(*hi - *lo <= costliest);
      }
    }
}

TEST_CASE("bucket reduce-scatters start as backward completes them and deliver the own gradients",
          "[buckets]") {
  // A power of two: the average of identical gradients, world g / world, is exact.
  const int world = 4, rank = 2;
  const Config cfg = bucket_config(1.0 / 1024);
  const ParamLayout layout(cfg.model);
  CpuBackend<float> be;
  RecordingComm comm(rank, world);
  Zero1Plan<float> plan(cfg, layout, be, comm, true);
  const std::vector<double> g64 = random_vector(layout.total(), 9);
  const std::vector<float> grads(g64.begin(), g64.end());

  for (const bool hooked : {true, false}) {
    INFO((hooked ? "started stage by stage" : "all started after backward"));
    comm.starts.clear();
    std::size_t expect = 0;
    if (hooked)
      for (int stage = 0; stage <= cfg.model.n_layers; ++stage) {
        plan.grads_ready(stage, grads.data());
        for (const GradBucket& b : plan.buckets())
          if (b.ready_stage == stage) expect += (b.piece ? 1 : 0) + (b.part ? 1 : 0);
        CHECK(comm.starts.size() == expect);
      }
    plan.reduce_gradients(grads.data());
    // Both ways: the same starts in the same order, all before the finish.
    std::vector<std::size_t> want;
    for (const GradBucket& b : plan.buckets()) {
      if (b.piece) want.push_back(b.piece);
      if (b.part) want.push_back(b.part);
    }
    CHECK(comm.starts == want);
    CHECK(comm.finished_after == want.size());

    // Averaged over identical ranks: each rank's own gradients, where the optimizers read them.
    for (const GradBucket& b : plan.buckets()) {
      const std::size_t begin = plan.own_piece(b);
      for (std::size_t k = 0; k < b.piece; ++k) {
        float want_g = 0;  // the padding
        for (std::size_t i : b.entries) {
          const AdamWEntry& e = plan.adamw()[i];
          if (begin + k >= e.flat && begin + k < e.flat + e.numel)
            want_g = grads[e.offset + (begin + k - e.flat)];
        }
        CHECK(plan.shard_grad()[b.shard_offset + k] == want_g);
      }
    }
    std::size_t owned = 0;
    for (const OwnedMatrix& mt : plan.matrices()) {
      if (!plan.owns(mt)) continue;
      ++owned;
      CHECK(std::memcmp(plan.matrix_grad(mt), grads.data() + mt.offset, mt.elems() * 4) == 0);
    }
    CHECK(owned > 0);
  }
  CHECK(comm.progress_calls > 0);
}

TEST_CASE("bucket sizes at the ends of the range: one bucket, or one per tensor", "[buckets]") {
  const ParamLayout layout(bucket_config(1).model);
  CpuBackend<float> be;
  RecordingComm comm(0, 2);
  const Zero1Plan<float> one(bucket_config(1e300), layout, be, comm, true);
  CHECK(one.buckets().size() == 1);
  const Zero1Plan<float> each(bucket_config(1e-300), layout, be, comm, true);
  CHECK(each.buckets().size() == layout.tensors().size());
}
