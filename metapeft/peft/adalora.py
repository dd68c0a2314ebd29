"""AdaLoRA (Zhang et al., 2023): low-rank updates in SVD form whose global rank budget is pruned by importance.

    h = x W + b + (alpha / init_r) * ((x P) * (lambda * mask)) Q,   P: (in, r), lambda: (r,), Q: (r, out)

- Importance of every entry: sensitivity I = |theta * grad| smoothed as I_bar = beta1 I_bar + (1 - beta1) I, times
  its uncertainty U_bar = beta2 U_bar + (1 - beta2) |I - I_bar|. A triplet (P[:, i], lambda_i, Q[i, :]) scores
  s(lambda_i) + mean s(P[:, i]) + mean s(Q[i, :]).
- Budget: init_r ranks per layer until ``prune_start``, then a cubic fall to target_r per layer at ``prune_end``
  (fractions of meta-training; Hugging Face peft's step counts are tinit = prune_start * T and
  tfinal = (1 - prune_end) * T), then constant. The least important active triplets across all layers are masked.
- Regularizer: orth_reg_weight * sum over layers of ||P^T P - I||^2 + ||Q Q^T - I||^2.

Under meta-learning, what is pruned is the meta-learned initialization: importance is computed from the
meta-gradient (the outer loop's gradient w.r.t. the initialization) after every meta-iteration, and the masks live
in the frozen tree, so inner loops never revive a pruned triplet (its lambda, P column and Q row get zero gradient)
and a masked triplet stays masked. The importance averages are data passed from one meta-iteration to the next
(``init_meta_state`` / ``after_meta_step``), and the adapted layers are read off the trees, so the method object
holds nothing but its config. P and Q start orthonormal, so the regularizer starts at zero; lambda starts at zero,
so the initial model equals the backbone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metapeft.backend import mx, utils
from metapeft.errors import require
from metapeft.models.layers import affine
from metapeft.peft.base import LowRankConfig, LowRankMethod
from metapeft.registry import PEFT_METHODS
from metapeft.trees import get_in, merge, path_name, paths_holding, set_in, without_key

# How each factor's entry scores feed its triplets' score: P by column, lambda as is, Q by row.
TRIPLET_SCORE = {"ada_p": lambda s: s.mean(axis=0), "ada_lambda": lambda s: s, "ada_q": lambda s: s.mean(axis=1)}


@dataclass
class AdaLoRAConfig(LowRankConfig):
    name: str = "adalora"
    init_r: int = 8
    target_r: int = 4
    prune_start: float = 0.2  # fraction of meta-training before pruning starts
    prune_end: float = 0.8  # fraction of meta-training at which the budget reaches target_r per layer
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1


@PEFT_METHODS.register("adalora", AdaLoRAConfig)
class AdaLoRA(LowRankMethod):
    needs_meta_learned_adapter = True  # importance comes from the adapter's meta-gradient
    hf_peft_type = "ADALORA"
    rank_key = "peft.init_r"
    down_key = "ada_p"

    def __init__(self, cfg: AdaLoRAConfig, model):
        require(cfg.init_r >= 1, "peft.init_r", f"must be >= 1, got {cfg.init_r}")
        require(1 <= cfg.target_r <= cfg.init_r, "peft.target_r",
                f"must be in 1..init_r={cfg.init_r}, got {cfg.target_r}")
        require(0 <= cfg.prune_start <= cfg.prune_end <= 1, "peft.prune_start", f"need 0 <= prune_start <= "
                f"prune_end <= 1 (fractions of meta-training), got prune_start={cfg.prune_start}, "
                f"prune_end={cfg.prune_end}")
        for key in ("beta1", "beta2"):
            require(0 <= getattr(cfg, key) < 1, f"peft.{key}", f"must be in [0, 1), got {getattr(cfg, key)}")
        require(cfg.orth_reg_weight >= 0, "peft.orth_reg_weight", f"must be >= 0, got {cfg.orth_reg_weight}")
        super().__init__(cfg, model)
        scale = self.scale

        def adalora_linear(params: dict, x: mx.array) -> mx.array:
            out = affine(params, x)
            if "ada_p" in params:
                singular_values = params["ada_lambda"] * params["ada_mask"]
                out = out + scale * (((x @ params["ada_p"]) * singular_values) @ params["ada_q"])
            return out

        self.model = model.with_linear(adalora_linear)

    def frozen(self, backbone: dict) -> dict:
        masks: dict = {}
        for path, _ in self.target_layers(backbone):
            set_in(masks, path, {"ada_mask": mx.ones((self.cfg.init_r,))})
        return merge(super().frozen(backbone), masks)

    def learnable_backbone(self, frozen: dict) -> dict:
        return without_key(frozen, "ada_mask")

    def low_rank_factors(self, adapted: dict, frozen: dict) -> dict[str, tuple]:
        factors = {}
        for path in paths_holding(adapted, "ada_p"):
            layer, mask = get_in(adapted, path), get_in(frozen, path)["ada_mask"]
            factors[path_name(path)] = (layer["ada_p"], layer["ada_lambda"] * mask, layer["ada_q"])
        return factors

    def hf_adapter_tensors(self, adapted: dict, frozen: dict, prefix: str) -> dict:
        """lora_A (r, in) = P^T, lora_E (r, 1) = lambda * mask (pruned triplets as zeros), lora_B (out, r) = Q^T;
        peft scales by lora_alpha / ranknum with ranknum = init_r, as ours."""
        tensors = {}
        for module, (down, singular, up) in self.low_rank_factors(adapted, frozen).items():
            tensors[f"{prefix}{module}.lora_A"] = down.T
            tensors[f"{prefix}{module}.lora_E"] = singular[:, None]
            tensors[f"{prefix}{module}.lora_B"] = up.T
        return tensors

    def hf_adapter_config(self, adapted: dict, num_iterations: int) -> dict:
        """peft's pruning schedule in its own step counts: tinit = prune_start T, tfinal = (1 - prune_end) T."""
        c = self.cfg
        return {**self.hf_common_config(adapted), "r": c.init_r, "init_r": c.init_r, "target_r": c.target_r,
                "beta1": c.beta1, "beta2": c.beta2, "orth_reg_weight": c.orth_reg_weight,
                "total_step": num_iterations, "tinit": round(c.prune_start * num_iterations),
                "tfinal": round((1 - c.prune_end) * num_iterations), "deltaT": 1, "rank_pattern": None}

    def init_adapter(self, backbone: dict, key: mx.array, sample_inputs: mx.array) -> dict:
        adapter: dict = {}
        r = self.cfg.init_r
        layers = self.target_layers(backbone)
        for layer_key, (path, layer) in zip(mx.random.split(key, len(layers)), layers):
            fan_in, fan_out = layer["weight"].shape
            k_p, k_q = mx.random.split(layer_key)
            set_in(adapter, path, {
                "ada_p": orthonormal_columns(k_p, fan_in, r),
                "ada_lambda": mx.zeros((r,)),
                "ada_q": orthonormal_columns(k_q, fan_out, r).T,
            })
        return adapter

    def regularizer(self, adapted: dict) -> mx.array | float:
        if self.cfg.orth_reg_weight == 0:
            return 0.0
        total = 0.0
        for path in paths_holding(adapted, "ada_p"):
            p, q = get_in(adapted, path)["ada_p"], get_in(adapted, path)["ada_q"]
            eye = mx.eye(p.shape[1])
            total = total + mx.sum(mx.square(p.T @ p - eye)) + mx.sum(mx.square(q @ q.T - eye))
        return self.cfg.orth_reg_weight * total

    def budget(self, step: int, num_iterations: int, num_layers: int) -> int:
        """Active triplets over all layers after ``step`` meta-iterations (the cubic schedule)."""
        start, end = num_layers * self.cfg.init_r, num_layers * self.cfg.target_r
        t_start, t_end = round(self.cfg.prune_start * num_iterations), round(self.cfg.prune_end * num_iterations)
        if step <= t_start:
            return start
        if step >= t_end:
            return end
        remaining = 1 - (step - t_start) / (t_end - t_start)
        return end + int((start - end) * remaining**3)

    def init_meta_state(self, meta_weights: dict) -> dict:
        """The sensitivity's moving average and its uncertainty's, per factor entry: zeros to start."""
        factors = {path_name(p): {f: get_in(meta_weights, p)[f] for f in TRIPLET_SCORE}
                   for p in paths_holding(meta_weights, "ada_p")}
        zeros = utils.tree_map(mx.zeros_like, factors)
        return {"smoothed": zeros, "uncertainty": zeros}

    def after_meta_step(self, meta_weights: dict, meta_grads: dict, frozen: dict, state: dict, iteration: int,
                        num_iterations: int) -> tuple[dict, dict]:
        c = self.cfg
        paths = paths_holding(frozen, "ada_mask")
        smoothed, uncertainty, scores = {}, {}, []
        for path in paths:
            weights, grads, name = get_in(meta_weights, path), get_in(meta_grads, path), path_name(path)
            smoothed[name], uncertainty[name], triplet = {}, {}, 0.0
            for factor, to_triplets in TRIPLET_SCORE.items():
                sensitivity = mx.abs(weights[factor] * grads[factor])
                smoothed[name][factor] = s = c.beta1 * state["smoothed"][name][factor] + (1 - c.beta1) * sensitivity
                uncertainty[name][factor] = u = (c.beta2 * state["uncertainty"][name][factor]
                                                 + (1 - c.beta2) * mx.abs(sensitivity - s))
                triplet = triplet + to_triplets(s * u)
            scores.append(triplet)
        state = {"smoothed": smoothed, "uncertainty": uncertainty}
        # Evaluate the moving averages now: left lazy, each step would stack another graph level on the last
        # (found in a full-mode run: gigabytes of graph before pruning began, then one very slow evaluation).
        mx.eval(state)
        masks = np.stack([np.array(get_in(frozen, p)["ada_mask"]) for p in paths])
        budget = self.budget(iteration + 1, num_iterations, len(paths))
        if masks.sum() <= budget:
            return frozen, state
        ranked = np.where(masks > 0, np.stack([np.array(s) for s in scores]), -np.inf).ravel()
        keep = np.zeros(ranked.size, dtype=np.float32)
        keep[np.argsort(-ranked, kind="stable")[:budget]] = 1.0
        updates: dict = {}
        for path, mask in zip(paths, keep.reshape(masks.shape)):
            set_in(updates, path, {"ada_mask": mx.array(mask)})
        return merge(frozen, updates), state

    def first_keepable_iteration(self, num_iterations: int) -> int:
        # After this iteration's pruning the budget is target_r per layer: an earlier, larger model is not AdaLoRA's
        # result, however well it validates.
        return max(0, round(self.cfg.prune_end * num_iterations) - 1)

    def report(self, frozen: dict) -> dict:
        ranks = {path_name(p): int(np.array(get_in(frozen, p)["ada_mask"]).sum())
                 for p in paths_holding(frozen, "ada_mask")}
        return {"final_rank_per_layer": ranks, "final_total_rank": sum(ranks.values()),
                "init_r": self.cfg.init_r, "target_r": self.cfg.target_r}


def orthonormal_columns(key: mx.array, rows: int, columns: int) -> mx.array:
    q, _ = mx.linalg.qr(mx.random.normal((rows, columns), key=key), stream=mx.cpu)
    return q[:, :columns]
