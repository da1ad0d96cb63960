// LiME's routing and modulation (steps 5-11 of docs/lime-semantics.md) as one CPU operator each way.
//
// On small layers the eager reference path's cost is host time: about 40 ATen operators forward and 70
// backward per layer (tests/test_eager.py counts them) for what is, per token, a handful of arithmetic over
// E experts and one pass over Dout channels. Here each token's routing runs in a small per-thread scratch
// and its output row is written in the same loop. The per-token steps follow `lime_kernels/eager.py`
// (which follows the reference): the same formulas in the same order, in the compute dtype (float32, or
// float64 when an input is, for gradcheck).
//
// Operators (namespace lime_cpu): `route_modulate` (base, delta -> out, probs) and its backward, and
// `lora_route_modulate`, which also computes delta = (scaling x A^T) B^T from the adapter (and its
// backward the gradients of x, A and B), so that a LoRA layer is one call each way. The forward operators'
// autograd kernels (the end of this file) make one C++ autograd node per call.
//
// Rows are tokens: `base`, `delta` (N, D) in any leading shape; the routing features `frozen`, `adapted`
// (N, E) when the caller pooled them (n-gram window, anchor, mean, last, DoRA's original features), else
// the first E channels of `base` and `delta`. Selections (`selection`): 0 dense AutoTop-K, 1 dense soft
// top-k, 2 hard top-k (dense or sparse), 3 sparse AutoTop-K, as the Triton kernels number them; ties in a
// top-k choice go to the lowest expert index.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr double kNormEps = 1e-6;    // reference.NORM_EPS
constexpr double kWeightEps = 1e-9;  // reference.WEIGHT_EPS

enum Selection : int64_t { kAutoDense = 0, kSoftDense = 1, kHard = 2, kAutoSparse = 3 };

struct Options {
  bool maxabs;
  int64_t selection;
  int64_t top_k;
  int64_t max_kept;  // sparse AutoTop-K: at most this many experts (the largest)
  double theta;      // AutoTop-K's threshold factor
  double tau;        // the soft mask's temperature
  double frozen_coef, adapted_coef;
};

// Enough tokens per parallel chunk that a chunk outweighs the cost of waking a thread.
int64_t token_grain(int64_t width) { return std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(width, 1)); }

// The routing features of the rows: the pooled ones the caller gave, or the first E channels.
template <typename scalar_t>
struct Features {
  const scalar_t* frozen;
  const scalar_t* adapted;
  int64_t stride;  // between rows: E for pooled features, D for base / delta themselves
};

// One token's routing, steps 5-9, and what its backward needs.
template <typename scalar_t>
struct Route {
  std::vector<scalar_t> u_hat, v_hat, probs, gate, weights;
  std::vector<char> keep;
  scalar_t u_norm, v_norm, u_scale, v_scale;
  scalar_t total;      // the weights' denominator
  scalar_t threshold;  // dense soft masks: the max (AutoTop-K) or the k-th largest probability
  int64_t kth;         // dense soft top-k: the index of the k-th largest probability
  bool floor_passes;   // hard masks: the kept sum reached WEIGHT_EPS

  explicit Route(int64_t experts)
      : u_hat(experts), v_hat(experts), probs(experts), gate(experts), weights(experts), keep(experts) {}
};

// The `count` largest probabilities (ties to the lowest index): marks them in `chosen`, returns the last one's index.
template <typename scalar_t>
int64_t top(const std::vector<scalar_t>& probs, int64_t count, std::vector<char>& chosen) {
  const int64_t experts = static_cast<int64_t>(probs.size());
  std::fill(chosen.begin(), chosen.end(), 0);
  int64_t index = 0;
  for (int64_t round = 0; round < count; ++round) {
    index = -1;
    for (int64_t e = 0; e < experts; ++e) {
      if (!chosen[e] && (index < 0 || probs[e] > probs[index])) index = e;
    }
    chosen[index] = 1;
  }
  return index;
}

// Steps 5-9 for token `row`. `u_norm_all`, `v_norm_all`: maxabs's batch-wide maxima of |u| and |v|.
template <typename scalar_t>
void route_token(const Features<scalar_t>& features, const scalar_t* jitter, int64_t row, int64_t experts,
                 const Options& options, scalar_t u_norm_all, scalar_t v_norm_all, Route<scalar_t>& route) {
  const scalar_t* u = features.frozen + row * features.stride;
  const scalar_t* v = features.adapted + row * features.stride;
  if (options.maxabs) {
    route.u_norm = u_norm_all;
    route.v_norm = v_norm_all;
  } else {
    scalar_t u_square = 0, v_square = 0;
    for (int64_t e = 0; e < experts; ++e) {
      u_square += u[e] * u[e];
      v_square += v[e] * v[e];
    }
    route.u_norm = std::sqrt(u_square);
    route.v_norm = std::sqrt(v_square);
  }
  route.u_scale = std::max(route.u_norm, static_cast<scalar_t>(kNormEps));
  route.v_scale = std::max(route.v_norm, static_cast<scalar_t>(kNormEps));
  const scalar_t frozen_coef = static_cast<scalar_t>(options.frozen_coef);
  const scalar_t adapted_coef = static_cast<scalar_t>(options.adapted_coef);
  std::vector<scalar_t>& probs = route.probs;
  scalar_t largest = -INFINITY;
  for (int64_t e = 0; e < experts; ++e) {
    route.u_hat[e] = u[e] / route.u_scale;
    route.v_hat[e] = v[e] / route.v_scale;
    scalar_t logit = route.u_hat[e] * frozen_coef + route.v_hat[e] * adapted_coef;
    if (jitter != nullptr) logit *= jitter[row * experts + e];
    probs[e] = logit;
    largest = std::max(largest, logit);
  }
  scalar_t sum = 0;
  for (int64_t e = 0; e < experts; ++e) {
    probs[e] = std::exp(probs[e] - largest);
    sum += probs[e];
  }
  scalar_t top_prob = 0;
  for (int64_t e = 0; e < experts; ++e) {
    probs[e] /= sum;
    top_prob = std::max(top_prob, probs[e]);
  }
  route.kth = -1;
  if (options.selection == kAutoDense || options.selection == kSoftDense) {
    scalar_t theta = 1;
    if (options.selection == kAutoDense) {
      route.threshold = top_prob;
      theta = static_cast<scalar_t>(options.theta);
    } else {
      route.kth = top(probs, options.top_k, route.keep);
      route.threshold = probs[route.kth];
    }
    const scalar_t tau = static_cast<scalar_t>(options.tau);
    scalar_t gated_sum = 0;
    for (int64_t e = 0; e < experts; ++e) {
      route.gate[e] = 1 / (1 + std::exp(-((probs[e] - theta * route.threshold) / tau)));
      route.weights[e] = probs[e] * route.gate[e];
      gated_sum += route.weights[e];
    }
    route.total = gated_sum + static_cast<scalar_t>(kWeightEps);
    for (int64_t e = 0; e < experts; ++e) route.weights[e] /= route.total;
    return;
  }
  if (options.selection == kHard) {
    top(probs, options.top_k, route.keep);
  } else {  // sparse AutoTop-K: the qualifying ones among the max_kept largest
    top(probs, options.max_kept, route.keep);
    const scalar_t cutoff = static_cast<scalar_t>(options.theta) * top_prob;
    for (int64_t e = 0; e < experts; ++e) route.keep[e] = route.keep[e] && probs[e] >= cutoff;
  }
  scalar_t kept_sum = 0;
  for (int64_t e = 0; e < experts; ++e) kept_sum += route.keep[e] ? probs[e] : scalar_t(0);
  route.floor_passes = kept_sum >= static_cast<scalar_t>(kWeightEps);
  route.total = std::max(kept_sum, static_cast<scalar_t>(kWeightEps));
  for (int64_t e = 0; e < experts; ++e) route.weights[e] = route.keep[e] ? probs[e] / route.total : scalar_t(0);
}

// maxabs: the max of |features| over every row (invalid ones included), one per side.
template <typename scalar_t>
std::pair<scalar_t, scalar_t> batch_maxima(const Features<scalar_t>& features, int64_t rows, int64_t experts) {
  scalar_t u_max = 0, v_max = 0;
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t e = 0; e < experts; ++e) {
      u_max = std::max(u_max, std::abs(features.frozen[row * features.stride + e]));
      v_max = std::max(v_max, std::abs(features.adapted[row * features.stride + e]));
    }
  }
  return {u_max, v_max};
}

// `w @ P + g * p_shared` of one token, into `modulation` (D). The loops over channels carry no dependence
// between iterations: `omp simd` lets the compiler vectorize them without proving that the pointers do not alias.
template <typename scalar_t>
void modulation_row(const std::vector<scalar_t>& weights, const scalar_t* experts_ptr, const scalar_t* shared,
                    scalar_t gamma, int64_t experts, int64_t width, scalar_t* modulation) {
  if (shared != nullptr) {
#pragma omp simd
    for (int64_t d = 0; d < width; ++d) modulation[d] = gamma * shared[d];
  } else {
    std::fill(modulation, modulation + width, scalar_t(0));
  }
  for (int64_t e = 0; e < experts; ++e) {
    const scalar_t weight = weights[e];
    const scalar_t* expert = experts_ptr + e * width;
#pragma omp simd
    for (int64_t d = 0; d < width; ++d) modulation[d] += weight * expert[d];
  }
}

Options make_options(bool maxabs, int64_t selection, int64_t top_k, int64_t max_kept, double theta, double tau,
                     double frozen_coef, double adapted_coef) {
  TORCH_CHECK(selection >= kAutoDense && selection <= kAutoSparse, "lime::route_modulate: selection must be 0..3; got ",
              selection);
  return Options{maxabs, selection, top_k, max_kept, theta, tau, frozen_coef, adapted_coef};
}

// `tensor` (..., width) as contiguous rows in `dtype`, its shape checked: the tensor itself when it already is
// (the kernels only index its data as rows x width), which spares small calls three dispatches per input.
at::Tensor as_rows(const at::Tensor& tensor, const char* name, int64_t rows, int64_t width, at::ScalarType dtype) {
  TORCH_CHECK(tensor.device().is_cpu(), "lime_cpu: ", name, " must be on the CPU; got ", tensor.device());
  TORCH_CHECK(tensor.dim() >= 1 && tensor.size(-1) == width && tensor.numel() == rows * width, "lime_cpu: ", name,
              " must have ", rows, " rows of ", width, " values; got shape ", tensor.sizes());
  if (tensor.scalar_type() == dtype && tensor.is_contiguous()) return tensor;
  return tensor.to(dtype).contiguous();
}

// `tensor` in `dtype` (itself when it is).
at::Tensor in_dtype(const at::Tensor& tensor, at::ScalarType dtype) {
  return tensor.scalar_type() == dtype ? tensor : tensor.to(dtype);
}

// float32, or float64 when any of the tensors is (reference.compute_dtype).
at::ScalarType compute_dtype(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* tensor : tensors) {
    if (tensor != nullptr && tensor->defined() && tensor->scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

// The inputs as contiguous rows in the compute dtype, with their shapes checked.
struct Inputs {
  at::Tensor base, delta, frozen, adapted, experts, shared, gamma, jitter, valid;
  int64_t rows, width, num_experts;
  at::ScalarType dtype;
};

Inputs prepare(const at::Tensor& base, const at::Tensor& delta, const std::optional<at::Tensor>& frozen,
               const std::optional<at::Tensor>& adapted, const at::Tensor& experts,
               const std::optional<at::Tensor>& shared, const std::optional<at::Tensor>& gamma,
               const std::optional<at::Tensor>& valid, const std::optional<at::Tensor>& jitter) {
  TORCH_CHECK(at::isFloatingType(base.scalar_type()) && at::isFloatingType(delta.scalar_type()),
              "lime_cpu: base and delta must be floating point; got ", base.scalar_type(), " and ",
              delta.scalar_type());
  TORCH_CHECK(base.dim() >= 1 && base.sizes() == delta.sizes(), "lime_cpu: base and delta must have one shape (..., Dout); got ",
              base.sizes(), " and ", delta.sizes());
  Inputs in;
  in.width = base.size(-1);
  in.rows = in.width == 0 ? 0 : base.numel() / in.width;
  in.num_experts = experts.dim() == 2 ? experts.size(0) : 0;
  TORCH_CHECK(experts.dim() == 2 && experts.size(1) == in.width && in.num_experts >= 1 && in.num_experts <= in.width,
              "lime_cpu: experts must be (E, Dout) with 1 <= E <= Dout = ", in.width, "; got ", experts.sizes());
  TORCH_CHECK(frozen.has_value() == adapted.has_value(), "lime_cpu: frozen and adapted features must be given together");
  TORCH_CHECK(shared.has_value() == gamma.has_value(), "lime_cpu: shared and gamma must be given together");
  const at::Tensor* shared_ptr = shared.has_value() ? &*shared : nullptr;
  in.dtype = compute_dtype({&base, &delta, &experts, shared_ptr});
  in.base = as_rows(base, "base", in.rows, in.width, in.dtype);
  in.delta = as_rows(delta, "delta", in.rows, in.width, in.dtype);
  if (frozen.has_value()) {
    in.frozen = as_rows(*frozen, "frozen", in.rows, in.num_experts, in.dtype);
    in.adapted = as_rows(*adapted, "adapted", in.rows, in.num_experts, in.dtype);
  }
  in.experts = as_rows(experts, "experts", in.num_experts, in.width, in.dtype);
  if (shared.has_value()) {
    TORCH_CHECK(gamma->numel() == 1, "lime_cpu: gamma must be one value; got shape ", gamma->sizes());
    in.shared = as_rows(*shared, "shared", 1, in.width, in.dtype);
    in.gamma = in_dtype(*gamma, in.dtype).contiguous();
  }
  if (jitter.has_value()) in.jitter = as_rows(*jitter, "jitter", in.rows, in.num_experts, in.dtype);
  if (valid.has_value()) {
    TORCH_CHECK(valid->scalar_type() == at::kBool, "lime_cpu: valid must be bool; got ", valid->scalar_type());
    TORCH_CHECK(valid->device().is_cpu() && valid->numel() == in.rows, "lime_cpu: valid must hold one flag per token (",
                in.rows, ") on the CPU; got shape ", valid->sizes(), " on ", valid->device());
    in.valid = valid->contiguous();
  }
  return in;
}

// `shape` (..., Dout) with its last size replaced.
std::vector<int64_t> with_last(at::IntArrayRef shape, int64_t last) {
  std::vector<int64_t> sizes(shape.begin(), shape.end());
  sizes.back() = last;
  return sizes;
}

template <typename scalar_t>
Features<scalar_t> features_of(const Inputs& in) {
  if (in.frozen.defined()) {
    return {in.frozen.data_ptr<scalar_t>(), in.adapted.data_ptr<scalar_t>(), in.num_experts};
  }
  return {in.base.data_ptr<scalar_t>(), in.delta.data_ptr<scalar_t>(), in.width};
}

template <typename T>
const T* pointer_or_null(const at::Tensor& tensor) {
  return tensor.defined() ? tensor.data_ptr<T>() : nullptr;
}

// What both directions read of the inputs: their data (null for an absent optional input), and maxabs's
// batch-wide maxima of |u| and |v| (zeros for the cosine router, which does not read them).
template <typename scalar_t>
struct Data {
  Features<scalar_t> features;
  const scalar_t *base, *delta, *experts, *shared, *jitter;
  const bool* valid;
  scalar_t gamma;
  std::pair<scalar_t, scalar_t> maxima{0, 0};

  Data(const Inputs& in, const Options& options)
      : features(features_of<scalar_t>(in)),
        base(in.base.data_ptr<scalar_t>()),
        delta(in.delta.data_ptr<scalar_t>()),
        experts(in.experts.data_ptr<scalar_t>()),
        shared(pointer_or_null<scalar_t>(in.shared)),
        jitter(pointer_or_null<scalar_t>(in.jitter)),
        valid(pointer_or_null<bool>(in.valid)),
        gamma(in.gamma.defined() ? *in.gamma.data_ptr<scalar_t>() : scalar_t(0)) {
    if (options.maxabs) maxima = batch_maxima(features, in.rows, in.num_experts);
  }
};

template <typename scalar_t>
void forward_impl(const Inputs& in, const Options& options, at::Tensor& out, at::Tensor& probs) {
  const int64_t experts = in.num_experts, width = in.width;
  const Data<scalar_t> data(in, options);
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  scalar_t* probs_ptr = probs.data_ptr<scalar_t>();
  at::parallel_for(0, in.rows, token_grain(width), [&](int64_t begin, int64_t end) {
    Route<scalar_t> route(experts);
    std::vector<scalar_t> modulation(width);
    for (int64_t row = begin; row < end; ++row) {
      route_token(data.features, data.jitter, row, experts, options, data.maxima.first, data.maxima.second,
                  route);
      std::copy(route.probs.begin(), route.probs.end(), probs_ptr + row * experts);
      const scalar_t* base_row = data.base + row * width;
      scalar_t* out_row = out_ptr + row * width;
      if (data.valid != nullptr && !data.valid[row]) {  // invalid tokens are `base`, exactly
        std::copy(base_row, base_row + width, out_row);
        continue;
      }
      modulation_row(route.weights, data.experts, data.shared, data.gamma, experts, width, modulation.data());
      const scalar_t* delta_row = data.delta + row * width;
#pragma omp simd
      for (int64_t d = 0; d < width; ++d) out_row[d] = base_row[d] + delta_row[d] * modulation[d];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> route_modulate(
    const at::Tensor& base, const at::Tensor& delta, const std::optional<at::Tensor>& frozen,
    const std::optional<at::Tensor>& adapted, const at::Tensor& experts, const std::optional<at::Tensor>& shared,
    const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& valid,
    const std::optional<at::Tensor>& jitter, bool maxabs, int64_t selection, int64_t top_k, int64_t max_kept,
    double theta, double tau, double frozen_coef, double adapted_coef) {
  const Options options = make_options(maxabs, selection, top_k, max_kept, theta, tau, frozen_coef, adapted_coef);
  const Inputs in = prepare(base, delta, frozen, adapted, experts, shared, gamma, valid, jitter);
  at::Tensor out = at::empty(base.sizes(), in.base.options());
  at::Tensor probs = at::empty(with_last(base.sizes(), in.num_experts), in.base.options());
  AT_DISPATCH_FLOATING_TYPES(in.dtype, "lime_route_modulate", [&] { forward_impl<scalar_t>(in, options, out, probs); });
  // In base's dtype: invalid tokens' rows are base's, converted there and back exactly.
  return {in_dtype(out, base.scalar_type()), probs};
}

// Step 9 backward: d(probs) from d(weights), as eager._modulation_backward writes it.
template <typename scalar_t>
void weights_backward(const Route<scalar_t>& route, const Options& options, int64_t experts,
                      const std::vector<scalar_t>& grad_weights, std::vector<scalar_t>& grad_probs) {
  scalar_t weighted = 0;
  for (int64_t e = 0; e < experts; ++e) weighted += grad_weights[e] * route.weights[e];
  if (options.selection == kAutoDense || options.selection == kSoftDense) {
    const scalar_t tau = static_cast<scalar_t>(options.tau);
    scalar_t threshold_sum = 0;
    for (int64_t e = 0; e < experts; ++e) {
      const scalar_t grad_gated = (grad_weights[e] - weighted) / route.total;
      const scalar_t gate = route.gate[e];
      const scalar_t grad_logit = grad_gated * route.probs[e] * ((1 - gate) * gate) / tau;
      grad_probs[e] = grad_gated * gate + grad_logit;
      threshold_sum += grad_logit;
    }
    if (options.selection == kSoftDense) {  // the k-th largest probability: to that expert, as topk's gradient is
      grad_probs[route.kth] -= threshold_sum;
      return;
    }
    // The max: shared evenly by tied maxima, as amax's gradient is.
    const scalar_t grad_threshold = -static_cast<scalar_t>(options.theta) * threshold_sum;
    int64_t ties = 0;
    for (int64_t e = 0; e < experts; ++e) ties += route.probs[e] == route.threshold;
    for (int64_t e = 0; e < experts; ++e) {
      if (route.probs[e] == route.threshold) grad_probs[e] += grad_threshold / static_cast<scalar_t>(ties);
    }
    return;
  }
  if (!route.floor_passes) weighted = 0;
  for (int64_t e = 0; e < experts; ++e) {
    grad_probs[e] = route.keep[e] ? (grad_weights[e] - weighted) / route.total : scalar_t(0);
  }
}

template <typename scalar_t>
struct Gradients {
  scalar_t* base;          // (N, D) or null
  scalar_t* delta;         // (N, D) or null
  scalar_t* frozen;        // (N, E) or null: the pooled features' gradients
  scalar_t* adapted;       // (N, E) or null
  scalar_t* experts;       // (E, D) or null
  scalar_t* column_sums;   // (D) or null: sum over tokens of d(modulation), for the shared vector and gamma
};

template <typename scalar_t>
void backward_impl(const Inputs& in, const Options& options, const at::Tensor& grad_out_tensor,
                   const at::Tensor& grad_probs_tensor, const Gradients<scalar_t>& grads) {
  const int64_t experts = in.num_experts, width = in.width, rows = in.rows;
  const Data<scalar_t> data(in, options);
  const Features<scalar_t>& features = data.features;
  const bool own_features = !in.frozen.defined();
  const scalar_t *delta = data.delta, *experts_ptr = data.experts, *jitter = data.jitter;
  const bool* valid = data.valid;
  const scalar_t* grad_out = pointer_or_null<scalar_t>(grad_out_tensor);
  const scalar_t* grad_probs_in = pointer_or_null<scalar_t>(grad_probs_tensor);
  // Per token, kept between the passes: the weights, d(logits), u_hat and v_hat (E each), and the two norms.
  const int64_t kept_width = 4 * experts + 2;
  std::vector<scalar_t> kept(rows * kept_width);
  auto kept_row = [&](int64_t row) { return kept.data() + row * kept_width; };
  // Pass 1, per token: the output row's gradients, then back through steps 9-6 to d(logits); the
  // normalization's backward needs maxabs's batch-wide sum first, so it is pass 2.
  at::parallel_for(0, rows, token_grain(width), [&](int64_t begin, int64_t end) {
    Route<scalar_t> route(experts);
    std::vector<scalar_t> modulation(width), grad_mod(width), grad_weights(experts), grad_probs(experts);
    for (int64_t row = begin; row < end; ++row) {
      route_token(features, jitter, row, experts, options, data.maxima.first, data.maxima.second, route);
      const bool is_valid = valid == nullptr || valid[row];
      std::fill(grad_weights.begin(), grad_weights.end(), scalar_t(0));
      const scalar_t* grad_row = grad_out == nullptr ? nullptr : grad_out + row * width;
      if (grads.base != nullptr) {  // the frozen path's gradient, the routed channels' added in pass 2
        scalar_t* base_row = grads.base + row * width;
        if (grad_row != nullptr) {
          std::copy(grad_row, grad_row + width, base_row);
        } else {
          std::fill(base_row, base_row + width, scalar_t(0));
        }
      }
      scalar_t* delta_grad_row = grads.delta == nullptr ? nullptr : grads.delta + row * width;
      if (grad_row != nullptr && is_valid) {  // out = base + delta * mod, mod = w @ P + g * p_shared
        const scalar_t* delta_row = delta + row * width;
#pragma omp simd
        for (int64_t d = 0; d < width; ++d) grad_mod[d] = grad_row[d] * delta_row[d];
        if (delta_grad_row != nullptr) {
          modulation_row(route.weights, experts_ptr, data.shared, data.gamma, experts, width, modulation.data());
#pragma omp simd
          for (int64_t d = 0; d < width; ++d) delta_grad_row[d] = grad_row[d] * modulation[d];
        }
        for (int64_t e = 0; e < experts; ++e) {
          const scalar_t* expert = experts_ptr + e * width;
          scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t d = 0; d < width; ++d) sum += grad_mod[d] * expert[d];
          grad_weights[e] = sum;
        }
      } else if (delta_grad_row != nullptr) {  // invalid tokens are `base`: nothing reaches the adapter
        std::fill(delta_grad_row, delta_grad_row + width, scalar_t(0));
      }
      weights_backward(route, options, experts, grad_weights, grad_probs);
      if (grad_probs_in != nullptr) {
        for (int64_t e = 0; e < experts; ++e) grad_probs[e] += grad_probs_in[row * experts + e];
      }
      // Softmax backward, then the jitter's factor.
      scalar_t dot = 0;
      for (int64_t e = 0; e < experts; ++e) dot += grad_probs[e] * route.probs[e];
      scalar_t* keep = kept_row(row);
      for (int64_t e = 0; e < experts; ++e) {
        scalar_t grad_logit = route.probs[e] * (grad_probs[e] - dot);
        if (jitter != nullptr) grad_logit *= jitter[row * experts + e];
        keep[e] = route.weights[e];
        keep[experts + e] = grad_logit;
        keep[2 * experts + e] = route.u_hat[e];
        keep[3 * experts + e] = route.v_hat[e];
      }
      keep[4 * experts] = route.u_norm;  // the norms themselves; the scales are max(norm, eps)
      keep[4 * experts + 1] = route.v_norm;
    }
  });
  // Pass 2, step 5 backward on each side: with g = d logits, the feature's gradient is
  // coef * (g - direction * sum(g * x_hat) * [norm >= eps]) / scale, where direction = d norm / d x:
  // x_hat (cosine, the sum per token), or sign(x) shared by the tied maxima of |x| (maxabs, the sum
  // over the whole batch).
  const scalar_t coefs[2] = {static_cast<scalar_t>(options.frozen_coef), static_cast<scalar_t>(options.adapted_coef)};
  const scalar_t* raw[2] = {features.frozen, features.adapted};
  scalar_t batch_inner[2] = {0, 0};
  int64_t batch_ties[2] = {0, 0};
  if (options.maxabs) {
    const scalar_t norms[2] = {data.maxima.first, data.maxima.second};
    for (int side = 0; side < 2; ++side) {
      for (int64_t row = 0; row < rows; ++row) {
        const scalar_t* keep = kept_row(row);
        for (int64_t e = 0; e < experts; ++e) {
          batch_inner[side] += keep[experts + e] * keep[(2 + side) * experts + e];
          batch_ties[side] += std::abs(raw[side][row * features.stride + e]) == norms[side];
        }
      }
    }
  }
  scalar_t* routed_grads[2] = {own_features ? grads.base : grads.frozen, own_features ? grads.delta : grads.adapted};
  const int64_t routed_stride = own_features ? width : experts;
  for (int64_t row = 0; row < rows; ++row) {
    const scalar_t* keep = kept_row(row);
    const scalar_t* grad_logit = keep + experts;
    for (int side = 0; side < 2; ++side) {
      scalar_t* target = routed_grads[side];
      if (target == nullptr) continue;
      target += row * routed_stride;
      const scalar_t* hat = keep + (2 + side) * experts;
      const scalar_t norm = keep[4 * experts + side];
      const scalar_t scale = std::max(norm, static_cast<scalar_t>(kNormEps));
      const bool norm_counts = norm >= static_cast<scalar_t>(kNormEps);
      scalar_t inner = 0;
      if (options.maxabs) {
        inner = norm_counts ? batch_inner[side] / static_cast<scalar_t>(batch_ties[side]) : scalar_t(0);
      } else if (norm_counts) {
        for (int64_t e = 0; e < experts; ++e) inner += grad_logit[e] * hat[e];
      }
      for (int64_t e = 0; e < experts; ++e) {
        scalar_t direction = hat[e];
        if (options.maxabs) {
          const scalar_t value = raw[side][row * features.stride + e];
          direction = std::abs(value) == norm ? (value > 0 ? scalar_t(1) : (value < 0 ? scalar_t(-1) : scalar_t(0)))
                                              : scalar_t(0);
        }
        const scalar_t grad = (grad_logit[e] - direction * inner) / scale * coefs[side];
        if (own_features) {
          target[e] += grad;
        } else {
          target[e] = grad;
        }
      }
    }
  }
  // Pass 3, per block of channels: the experts' gradient sum_t w[t] (x) d(mod)[t] and the column sums of
  // d(mod), in a fixed order (no atomics: the same bits whatever the thread count).
  if (grad_out == nullptr || (grads.experts == nullptr && grads.column_sums == nullptr)) return;
  const int64_t column_block = 256;
  const int64_t blocks = (width + column_block - 1) / column_block;
  at::parallel_for(0, blocks, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(rows * column_block, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> grad_mod(column_block);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * column_block;
      const int64_t count = std::min(column_block, width - first);
      if (grads.experts != nullptr) {
        for (int64_t e = 0; e < experts; ++e) {
          std::fill(grads.experts + e * width + first, grads.experts + e * width + first + count, scalar_t(0));
        }
      }
      if (grads.column_sums != nullptr) std::fill(grads.column_sums + first, grads.column_sums + first + count, scalar_t(0));
      for (int64_t row = 0; row < rows; ++row) {
        if (valid != nullptr && !valid[row]) continue;
        const scalar_t* grad_row = grad_out + row * width + first;
        const scalar_t* delta_row = delta + row * width + first;
#pragma omp simd
        for (int64_t d = 0; d < count; ++d) grad_mod[d] = grad_row[d] * delta_row[d];
        if (grads.experts != nullptr) {
          const scalar_t* weights = kept_row(row);
          for (int64_t e = 0; e < experts; ++e) {
            const scalar_t weight = weights[e];
            scalar_t* target = grads.experts + e * width + first;
#pragma omp simd
            for (int64_t d = 0; d < count; ++d) target[d] += weight * grad_mod[d];
          }
        }
        if (grads.column_sums != nullptr) {
          scalar_t* sums = grads.column_sums + first;
#pragma omp simd
          for (int64_t d = 0; d < count; ++d) sums[d] += grad_mod[d];
        }
      }
    }
  });
}

// Gradients of `route_modulate`'s inputs. Returns (grad_base, grad_delta, grad_frozen, grad_adapted, grad_experts,
// grad_shared, grad_gamma); one not asked for (or not defined: the features with own features, the shared
// vector's without one) is an empty tensor. `grad_base` and `grad_delta` with own features include the
// routed channels' gradients.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_modulate_backward(
    const std::optional<at::Tensor>& grad_out, const std::optional<at::Tensor>& grad_probs, const at::Tensor& base,
    const at::Tensor& delta, const std::optional<at::Tensor>& frozen, const std::optional<at::Tensor>& adapted,
    const at::Tensor& experts, const std::optional<at::Tensor>& shared, const std::optional<at::Tensor>& gamma,
    const std::optional<at::Tensor>& valid, const std::optional<at::Tensor>& jitter, bool maxabs, int64_t selection,
    int64_t top_k, int64_t max_kept, double theta, double tau, double frozen_coef, double adapted_coef,
    bool needs_base, bool needs_delta, bool needs_features, bool needs_experts, bool needs_shared) {
  const Options options = make_options(maxabs, selection, top_k, max_kept, theta, tau, frozen_coef, adapted_coef);
  const Inputs in = prepare(base, delta, frozen, adapted, experts, shared, gamma, valid, jitter);
  const auto tensor_options = in.base.options();
  // What was not asked for: an empty tensor of its own (outputs must not alias one another).
  auto none = [&] { return at::empty({0}, tensor_options); };
  at::Tensor grad_out_c, grad_probs_c;
  if (grad_out.has_value()) grad_out_c = as_rows(*grad_out, "grad_out", in.rows, in.width, in.dtype);
  if (grad_probs.has_value()) grad_probs_c = as_rows(*grad_probs, "grad_probs", in.rows, in.num_experts, in.dtype);
  const bool own_features = !in.frozen.defined();
  const bool feature_grads = !own_features && needs_features;
  const bool with_shared = needs_shared && in.shared.defined();
  // Without an output gradient (only the statistics were differentiated) the experts, the shared vector and
  // gamma get zeros, which pass 3 is skipped for.
  auto zeros_or_empty = [&](at::IntArrayRef shape) {
    return grad_out.has_value() ? at::empty(shape, tensor_options) : at::zeros(shape, tensor_options);
  };
  at::Tensor grad_base = needs_base ? at::empty(base.sizes(), tensor_options) : none();
  at::Tensor grad_delta = needs_delta ? at::empty(delta.sizes(), tensor_options) : none();
  at::Tensor grad_frozen = feature_grads ? at::empty(frozen->sizes(), tensor_options) : none();
  at::Tensor grad_adapted = feature_grads ? at::empty(adapted->sizes(), tensor_options) : none();
  at::Tensor grad_experts = needs_experts ? zeros_or_empty({in.num_experts, in.width}) : none();
  at::Tensor grad_shared = with_shared ? zeros_or_empty({in.width}) : none();
  at::Tensor grad_gamma = with_shared ? at::zeros({}, tensor_options) : none();
  AT_DISPATCH_FLOATING_TYPES(in.dtype, "lime_route_modulate_backward", [&] {
    std::vector<scalar_t> column_sums(with_shared ? in.width : 0);
    const Gradients<scalar_t> grads{needs_base ? grad_base.data_ptr<scalar_t>() : nullptr,
                                    needs_delta ? grad_delta.data_ptr<scalar_t>() : nullptr,
                                    feature_grads ? grad_frozen.data_ptr<scalar_t>() : nullptr,
                                    feature_grads ? grad_adapted.data_ptr<scalar_t>() : nullptr,
                                    needs_experts ? grad_experts.data_ptr<scalar_t>() : nullptr,
                                    with_shared ? column_sums.data() : nullptr};
    backward_impl<scalar_t>(in, options, grad_out_c, grad_probs_c, grads);
    if (with_shared && grad_out.has_value()) {  // d(g * p_shared): g * column sums for p_shared, their dot with it for g
      const scalar_t gamma_value = *in.gamma.data_ptr<scalar_t>();
      const scalar_t* shared_ptr = in.shared.data_ptr<scalar_t>();
      scalar_t* grad_shared_ptr = grad_shared.data_ptr<scalar_t>();
      scalar_t dot = 0;
      for (int64_t d = 0; d < in.width; ++d) {
        grad_shared_ptr[d] = gamma_value * column_sums[d];
        dot += column_sums[d] * shared_ptr[d];
      }
      *grad_gamma.data_ptr<scalar_t>() = dot;
    }
  });
  // Each in the shape and dtype of its input (delta's and the features' stay in the compute dtype).
  if (needs_base) grad_base = in_dtype(grad_base, base.scalar_type());
  if (needs_experts) grad_experts = in_dtype(grad_experts, experts.scalar_type());
  if (with_shared) {
    grad_shared = in_dtype(grad_shared.view(shared->sizes()), shared->scalar_type());
    grad_gamma = in_dtype(grad_gamma.view(gamma->sizes()), gamma->scalar_type());
  }
  return {grad_base, grad_delta, grad_frozen, grad_adapted, grad_experts, grad_shared, grad_gamma};
}

// The LoRA adapter and the routing in one call each way (`eager.lime_linear` with per-token routing):
// `delta = (scaling * x A^T) B^T` in the compute dtype of x, A and B, then `route_modulate(base, delta)`.
// Returns (out, probs, projected, delta); the last two are what the backward reads.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_route_modulate(
    const at::Tensor& x, const at::Tensor& base, const at::Tensor& A, const at::Tensor& B, double scaling,
    const at::Tensor& experts, const std::optional<at::Tensor>& shared, const std::optional<at::Tensor>& gamma,
    const std::optional<at::Tensor>& valid, const std::optional<at::Tensor>& jitter, bool maxabs, int64_t selection,
    int64_t top_k, int64_t max_kept, double theta, double tau, double frozen_coef, double adapted_coef) {
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2 && x.dim() >= 1 && x.size(-1) == A.size(1) && B.size(1) == A.size(0),
              "lime_cpu: x (..., Din), A (r, Din) and B (Dout, r) must agree; got ", x.sizes(), ", ", A.sizes(), " and ",
              B.sizes());
  const at::ScalarType dtype = compute_dtype({&x, &A, &B});
  const at::Tensor flat_input = in_dtype(x.reshape({-1, x.size(-1)}), dtype);
  at::Tensor projected = at::mm(flat_input, in_dtype(A, dtype).t()).mul_(scaling);
  at::Tensor delta = at::mm(projected, in_dtype(B, dtype).t()).view(with_last(x.sizes(), B.size(0)));
  auto [out, probs] = route_modulate(base, delta, std::nullopt, std::nullopt, experts, shared, gamma, valid, jitter,
                                     maxabs, selection, top_k, max_kept, theta, tau, frozen_coef, adapted_coef);
  return {out, probs, projected, delta};
}

// Gradients of `lora_route_modulate`'s inputs: (grad_base, grad_x, grad_A, grad_B, grad_experts, grad_shared,
// grad_gamma), each in its input's shape and dtype; one not asked for is an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lora_route_modulate_backward(
    const std::optional<at::Tensor>& grad_out, const std::optional<at::Tensor>& grad_probs, const at::Tensor& x,
    const at::Tensor& projected, const at::Tensor& A, const at::Tensor& B, double scaling, const at::Tensor& base,
    const at::Tensor& delta, const at::Tensor& experts, const std::optional<at::Tensor>& shared,
    const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& valid,
    const std::optional<at::Tensor>& jitter, bool maxabs, int64_t selection, int64_t top_k, int64_t max_kept,
    double theta, double tau, double frozen_coef, double adapted_coef, bool needs_base, bool needs_x, bool needs_A,
    bool needs_B, bool needs_experts, bool needs_shared) {
  const bool wants_delta = needs_x || needs_A || needs_B;
  auto [grad_base, grad_delta, grad_frozen, grad_adapted, grad_experts, grad_shared, grad_gamma] =
      route_modulate_backward(grad_out, grad_probs, base, delta, std::nullopt, std::nullopt, experts, shared, gamma,
                              valid, jitter, maxabs, selection, top_k, max_kept, theta, tau, frozen_coef, adapted_coef,
                              needs_base, wants_delta, false, needs_experts, needs_shared);
  auto none = [&] { return at::empty({0}, projected.options()); };  // one each: outputs must not alias
  at::Tensor grad_x = none(), grad_A = none(), grad_B = none();
  if (wants_delta) {  // delta = (scaling x A^T) B^T
    const at::ScalarType dtype = projected.scalar_type();
    const at::Tensor flat_grad = in_dtype(grad_delta.reshape({-1, grad_delta.size(-1)}), dtype);
    if (needs_B) grad_B = in_dtype(at::mm(flat_grad.t(), projected), B.scalar_type());
    const at::Tensor grad_projected = at::mm(flat_grad, in_dtype(B, dtype)).mul_(scaling);
    if (needs_A) grad_A = in_dtype(at::mm(grad_projected.t(), in_dtype(x.reshape({-1, x.size(-1)}), dtype)), A.scalar_type());
    if (needs_x) grad_x = in_dtype(at::mm(grad_projected, in_dtype(A, dtype)).view(x.sizes()), x.scalar_type());
  }
  return {grad_base, grad_x, grad_A, grad_B, grad_experts, grad_shared, grad_gamma};
}

// --- Autograd: one C++ node per call, its backward the backward operator ------------------------------------
//
// Registered for the Autograd dispatch key, so that a call that records a graph creates its node here rather than
// in a Python `torch.autograd.Function`: on small layers the Python node's bookkeeping (its context, saving the
// inputs, the Python backward frame) cost about as much host time as the operators' own arithmetic (about 25 us
// forward and 14 us backward per layer in the tiny model's training step). The forward
// redispatches below autograd to the CPU kernel (or to the fake one when tracing); the backward calls the backward
// operator through the dispatcher, so torch.compile and opcheck trace it as they trace the forward.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kOptionNames[] = {"maxabs", "selection", "top_k", "max_kept", "theta", "tau", "frozen_coef",
                                        "adapted_coef"};

void save_options(AutogradContext* ctx, bool maxabs, int64_t selection, int64_t top_k, int64_t max_kept, double theta,
                  double tau, double frozen_coef, double adapted_coef) {
  ctx->saved_data[kOptionNames[0]] = maxabs;
  ctx->saved_data[kOptionNames[1]] = selection;
  ctx->saved_data[kOptionNames[2]] = top_k;
  ctx->saved_data[kOptionNames[3]] = max_kept;
  ctx->saved_data[kOptionNames[4]] = theta;
  ctx->saved_data[kOptionNames[5]] = tau;
  ctx->saved_data[kOptionNames[6]] = frozen_coef;
  ctx->saved_data[kOptionNames[7]] = adapted_coef;
}

// The routing options as the backward operators take them, from what `save_options` kept.
struct SavedOptions {
  bool maxabs;
  int64_t selection, top_k, max_kept;
  double theta, tau, frozen_coef, adapted_coef;

  explicit SavedOptions(AutogradContext* ctx)
      : maxabs(ctx->saved_data[kOptionNames[0]].toBool()),
        selection(ctx->saved_data[kOptionNames[1]].toInt()),
        top_k(ctx->saved_data[kOptionNames[2]].toInt()),
        max_kept(ctx->saved_data[kOptionNames[3]].toInt()),
        theta(ctx->saved_data[kOptionNames[4]].toDouble()),
        tau(ctx->saved_data[kOptionNames[5]].toDouble()),
        frozen_coef(ctx->saved_data[kOptionNames[6]].toDouble()),
        adapted_coef(ctx->saved_data[kOptionNames[7]].toDouble()) {}
};

// An operator of this file as the dispatcher holds it (`Schema`: its kernel's type): the autograd kernels call the
// forward operators below autograd (their CPU or fake kernels) and the backward operators through it, which is what
// a traced backward records.
template <typename Schema>
c10::TypedOperatorHandle<Schema> dispatched(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Schema>();
}

auto& route_modulate_op() {
  static auto op = dispatched<decltype(route_modulate)>("lime_cpu::route_modulate");
  return op;
}

auto& lora_route_modulate_op() {
  static auto op = dispatched<decltype(lora_route_modulate)>("lime_cpu::lora_route_modulate");
  return op;
}

auto& route_modulate_backward_op() {
  static auto op = dispatched<decltype(route_modulate_backward)>("lime_cpu::route_modulate_backward");
  return op;
}

auto& lora_route_modulate_backward_op() {
  static auto op = dispatched<decltype(lora_route_modulate_backward)>("lime_cpu::lora_route_modulate_backward");
  return op;
}

// Whether a call records a graph (gradients on, an input requiring one). Where it does not (evaluation,
// decoding) the call goes straight to the kernel, without building the node that `Function::apply` would
// build and drop.
bool requires_grad(const at::Tensor& tensor) { return tensor.defined() && tensor.requires_grad(); }

bool requires_grad(const std::optional<at::Tensor>& tensor) { return tensor.has_value() && requires_grad(*tensor); }

template <typename... Tensors>
bool records_graph(const Tensors&... tensors) {
  return at::GradMode::is_enabled() && (requires_grad(tensors) || ...);
}

std::optional<at::Tensor> defined_or_none(const at::Tensor& tensor) {
  return tensor.defined() ? std::optional<at::Tensor>(tensor) : std::nullopt;
}

at::Tensor wanted(const at::Tensor& gradient, bool needed) { return needed ? gradient : at::Tensor(); }

// The forward's gradients are asked for per autograd edge, and only tensors that were given have an edge: `edges`
// turns an argument's position into its edge (or -1) from which optional arguments were given.
struct Edges {
  std::vector<int64_t> of_argument;
  Edges(std::initializer_list<bool> given) {
    int64_t next = 0;
    for (bool is_tensor : given) of_argument.push_back(is_tensor ? next++ : -1);
  }
  bool needs(const AutogradContext* ctx, size_t argument) const {
    return of_argument[argument] >= 0 && ctx->needs_input_grad(static_cast<size_t>(of_argument[argument]));
  }
};

class RouteModulateFunction : public torch::autograd::Function<RouteModulateFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& base, const at::Tensor& delta,
                               const std::optional<at::Tensor>& frozen, const std::optional<at::Tensor>& adapted,
                               const at::Tensor& experts, const std::optional<at::Tensor>& shared,
                               const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& valid,
                               const std::optional<at::Tensor>& jitter, bool maxabs, int64_t selection, int64_t top_k,
                               int64_t max_kept, double theta, double tau, double frozen_coef, double adapted_coef) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, probs] = route_modulate_op().call(base, delta, frozen, adapted, experts, shared, gamma, valid, jitter,
                                                 maxabs, selection, top_k, max_kept, theta, tau, frozen_coef,
                                                 adapted_coef);
    ctx->set_materialize_grads(false);  // an unused output's gradient arrives undefined, not as zeros
    ctx->save_for_backward({base, delta, frozen.value_or(at::Tensor()), adapted.value_or(at::Tensor()), experts,
                            shared.value_or(at::Tensor()), gamma.value_or(at::Tensor()), valid.value_or(at::Tensor()),
                            jitter.value_or(at::Tensor())});
    save_options(ctx, maxabs, selection, top_k, max_kept, theta, tau, frozen_coef, adapted_coef);
    return {out, probs};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(17);  // one per forward argument
    const at::Tensor &grad_out = grads[0], &grad_probs = grads[1];
    if (!grad_out.defined() && !grad_probs.defined()) return result;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &base = saved[0], &delta = saved[1], &frozen = saved[2], &adapted = saved[3], &experts = saved[4],
                     &shared = saved[5], &gamma = saved[6], &valid = saved[7], &jitter = saved[8];
    const Edges edges{true, true, frozen.defined(), adapted.defined(), true, shared.defined(), gamma.defined()};
    const bool needs_base = edges.needs(ctx, 0), needs_delta = edges.needs(ctx, 1);
    const bool needs_features = edges.needs(ctx, 2) || edges.needs(ctx, 3);
    // Only the statistics differentiated: nothing reaches the experts, the shared vector or gamma.
    const bool needs_experts = grad_out.defined() && edges.needs(ctx, 4);
    const bool needs_shared = grad_out.defined() && (edges.needs(ctx, 5) || edges.needs(ctx, 6));
    const SavedOptions o(ctx);
    auto [grad_base, grad_delta, grad_frozen, grad_adapted, grad_experts, grad_shared, grad_gamma] =
        route_modulate_backward_op().call(
            defined_or_none(grad_out), defined_or_none(grad_probs), base, delta, defined_or_none(frozen),
            defined_or_none(adapted), experts, defined_or_none(shared), defined_or_none(gamma),
            defined_or_none(valid), defined_or_none(jitter), o.maxabs, o.selection, o.top_k, o.max_kept, o.theta,
            o.tau, o.frozen_coef, o.adapted_coef, needs_base, needs_delta, needs_features, needs_experts,
            needs_shared);
    result[0] = wanted(grad_base, needs_base);
    result[1] = wanted(grad_delta, needs_delta);
    result[2] = wanted(grad_frozen, needs_features && frozen.defined());
    result[3] = wanted(grad_adapted, needs_features && adapted.defined());
    result[4] = wanted(grad_experts, needs_experts);
    result[5] = wanted(grad_shared, needs_shared);
    result[6] = wanted(grad_gamma, needs_shared);
    return result;
  }
};

class LoraRouteModulateFunction : public torch::autograd::Function<LoraRouteModulateFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& base, const at::Tensor& A,
                               const at::Tensor& B, double scaling, const at::Tensor& experts,
                               const std::optional<at::Tensor>& shared, const std::optional<at::Tensor>& gamma,
                               const std::optional<at::Tensor>& valid, const std::optional<at::Tensor>& jitter,
                               bool maxabs, int64_t selection, int64_t top_k, int64_t max_kept, double theta, double tau,
                               double frozen_coef, double adapted_coef) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, probs, projected, delta] =
        lora_route_modulate_op().call(x, base, A, B, scaling, experts, shared, gamma, valid, jitter, maxabs, selection,
                                      top_k, max_kept, theta, tau, frozen_coef, adapted_coef);
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({projected, delta});  // what the backward reads, not results
    ctx->save_for_backward({x, projected, A, B, base, delta, experts, shared.value_or(at::Tensor()),
                            gamma.value_or(at::Tensor()), valid.value_or(at::Tensor()), jitter.value_or(at::Tensor())});
    ctx->saved_data["scaling"] = scaling;
    save_options(ctx, maxabs, selection, top_k, max_kept, theta, tau, frozen_coef, adapted_coef);
    return {out, probs, projected, delta};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(18);  // one per forward argument
    const at::Tensor &grad_out = grads[0], &grad_probs = grads[1];
    if (!grad_out.defined() && !grad_probs.defined()) return result;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &projected = saved[1], &A = saved[2], &B = saved[3], &base = saved[4],
                     &delta = saved[5], &experts = saved[6], &shared = saved[7], &gamma = saved[8], &valid = saved[9],
                     &jitter = saved[10];
    // Edges: x, base, A, B, then (after `scaling`) experts, shared and gamma when given.
    const Edges edges{true, true, true, true, false, true, shared.defined(), gamma.defined()};
    const bool needs_x = edges.needs(ctx, 0), needs_base = edges.needs(ctx, 1);
    const bool needs_A = edges.needs(ctx, 2), needs_B = edges.needs(ctx, 3);
    const bool needs_experts = grad_out.defined() && edges.needs(ctx, 5);
    const bool needs_shared = grad_out.defined() && (edges.needs(ctx, 6) || edges.needs(ctx, 7));
    const SavedOptions o(ctx);
    auto [grad_base, grad_x, grad_A, grad_B, grad_experts, grad_shared, grad_gamma] =
        lora_route_modulate_backward_op().call(
            defined_or_none(grad_out), defined_or_none(grad_probs), x, projected, A, B,
            ctx->saved_data["scaling"].toDouble(), base, delta, experts, defined_or_none(shared),
            defined_or_none(gamma), defined_or_none(valid), defined_or_none(jitter), o.maxabs, o.selection, o.top_k,
            o.max_kept, o.theta, o.tau, o.frozen_coef, o.adapted_coef, needs_base, needs_x, needs_A, needs_B,
            needs_experts, needs_shared);
    result[0] = wanted(grad_x, needs_x);
    result[1] = wanted(grad_base, needs_base);
    result[2] = wanted(grad_A, needs_A);
    result[3] = wanted(grad_B, needs_B);
    result[5] = wanted(grad_experts, needs_experts);
    result[6] = wanted(grad_shared, needs_shared);
    result[7] = wanted(grad_gamma, needs_shared);
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> route_modulate_autograd(
    const at::Tensor& base, const at::Tensor& delta, const std::optional<at::Tensor>& frozen,
    const std::optional<at::Tensor>& adapted, const at::Tensor& experts, const std::optional<at::Tensor>& shared,
    const std::optional<at::Tensor>& gamma, const std::optional<at::Tensor>& valid,
    const std::optional<at::Tensor>& jitter, bool maxabs, int64_t selection, int64_t top_k, int64_t max_kept,
    double theta, double tau, double frozen_coef, double adapted_coef) {
  if (!records_graph(base, delta, frozen, adapted, experts, shared, gamma)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return route_modulate_op().call(base, delta, frozen, adapted, experts, shared, gamma, valid, jitter, maxabs,
                                    selection, top_k, max_kept, theta, tau, frozen_coef, adapted_coef);
  }
  variable_list outputs = RouteModulateFunction::apply(base, delta, frozen, adapted, experts, shared, gamma, valid,
                                                       jitter, maxabs, selection, top_k, max_kept, theta, tau,
                                                       frozen_coef, adapted_coef);
  return {outputs[0], outputs[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_route_modulate_autograd(
    const at::Tensor& x, const at::Tensor& base, const at::Tensor& A, const at::Tensor& B, double scaling,
    const at::Tensor& experts, const std::optional<at::Tensor>& shared, const std::optional<at::Tensor>& gamma,
    const std::optional<at::Tensor>& valid, const std::optional<at::Tensor>& jitter, bool maxabs, int64_t selection,
    int64_t top_k, int64_t max_kept, double theta, double tau, double frozen_coef, double adapted_coef) {
  if (!records_graph(x, base, A, B, experts, shared, gamma)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return lora_route_modulate_op().call(x, base, A, B, scaling, experts, shared, gamma, valid, jitter, maxabs,
                                         selection, top_k, max_kept, theta, tau, frozen_coef, adapted_coef);
  }
  variable_list outputs = LoraRouteModulateFunction::apply(x, base, A, B, scaling, experts, shared, gamma, valid,
                                                           jitter, maxabs, selection, top_k, max_kept, theta, tau,
                                                           frozen_coef, adapted_coef);
  return {outputs[0], outputs[1], outputs[2], outputs[3]};
}

}  // namespace

TORCH_LIBRARY(lime_cpu, m) {
  m.def(
      "route_modulate(Tensor base, Tensor delta, Tensor? frozen, Tensor? adapted, Tensor experts, Tensor? shared, "
      "Tensor? gamma, Tensor? valid, Tensor? jitter, bool maxabs, int selection, int top_k, int max_kept, "
      "float theta, float tau, float frozen_coef, float adapted_coef) -> (Tensor out, Tensor probs)");
  m.def(
      "route_modulate_backward(Tensor? grad_out, Tensor? grad_probs, Tensor base, Tensor delta, Tensor? frozen, "
      "Tensor? adapted, Tensor experts, Tensor? shared, Tensor? gamma, Tensor? valid, Tensor? jitter, bool maxabs, "
      "int selection, int top_k, int max_kept, float theta, float tau, float frozen_coef, float adapted_coef, "
      "bool needs_base, bool needs_delta, bool needs_features, bool needs_experts, bool needs_shared) -> "
      "(Tensor grad_base, Tensor grad_delta, Tensor grad_frozen, Tensor grad_adapted, Tensor grad_experts, "
      "Tensor grad_shared, Tensor grad_gamma)");
  m.def(
      "lora_route_modulate(Tensor x, Tensor base, Tensor A, Tensor B, float scaling, Tensor experts, Tensor? shared, "
      "Tensor? gamma, Tensor? valid, Tensor? jitter, bool maxabs, int selection, int top_k, int max_kept, float theta, "
      "float tau, float frozen_coef, float adapted_coef) -> (Tensor out, Tensor probs, Tensor projected, Tensor delta)");
  m.def(
      "lora_route_modulate_backward(Tensor? grad_out, Tensor? grad_probs, Tensor x, Tensor projected, Tensor A, "
      "Tensor B, float scaling, Tensor base, Tensor delta, Tensor experts, Tensor? shared, Tensor? gamma, "
      "Tensor? valid, Tensor? jitter, bool maxabs, int selection, int top_k, int max_kept, float theta, float tau, "
      "float frozen_coef, float adapted_coef, bool needs_base, bool needs_x, bool needs_A, bool needs_B, "
      "bool needs_experts, bool needs_shared) -> (Tensor grad_base, Tensor grad_x, Tensor grad_A, Tensor grad_B, "
      "Tensor grad_experts, Tensor grad_shared, Tensor grad_gamma)");
}

TORCH_LIBRARY_IMPL(lime_cpu, CPU, m) {
  m.impl("route_modulate", &route_modulate);
  m.impl("route_modulate_backward", &route_modulate_backward);
  m.impl("lora_route_modulate", &lora_route_modulate);
  m.impl("lora_route_modulate_backward", &lora_route_modulate_backward);
}

TORCH_LIBRARY_IMPL(lime_cpu, Autograd, m) {
  m.impl("route_modulate", &route_modulate_autograd);
  m.impl("lora_route_modulate", &lora_route_modulate_autograd);
}
