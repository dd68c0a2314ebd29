"""AdaLoRA (Zhang et al., 2023): low-rank updates in SVD form whose global rank budget is pruned by importance.

    h = x W + b + (alpha / init_r) * ((x P) * (lambda * mask)) Q,   P: (in, r), lambda: (r,), Q: (r, out)

- Importance of every entry: sensitivity I = |theta * grad| smoothed as I_bar = beta1 I_bar + (1 - beta1) I, times
  its uncertainty U_bar = beta2 U_bar + (1 - beta2) |I - I_bar|. A triplet (P[:, i], lambda_i, Q[i, :]) scores
  s(lambda_i) + mean s(P[:, i]) + mean s(Q[i, :]).
- Budget: init_r ranks per layer until ``tinit``, then a cubic fall to target_r per layer at ``tfinal`` (fractions
  of meta-training), then constant. The least important active triplets across all layers are masked.
- Regularizer: orth_reg_weight * sum over layers of ||P^T P - I||^2 + ||Q Q^T - I||^2.

Under meta-learning, what is pruned is the meta-learned initialization: importance is computed from the
meta-gradient (the outer loop's gradient w.r.t. the initialization) after every meta-iteration, and the masks live
in the frozen tree, so inner loops never revive a pruned triplet (its lambda, P column and Q row get zero gradient)
and a masked triplet stays masked. P and Q start orthonormal, so the regularizer starts at zero; lambda starts at
zero, so the initial model equals the backbone.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from metapeft.config import require
from metapeft.models.layers import affine
from metapeft.peft.base import LowRankConfig, LowRankMethod
from metapeft.registry import PEFT_METHODS
from metapeft.trees import get_in, merge, path_name, set_in

FACTORS = ("ada_p", "ada_lambda", "ada_q")


@dataclass
class AdaLoRAConfig(LowRankConfig):
    name: str = "adalora"
    init_r: int = 8
    target_r: int = 4
    tinit: float = 0.2  # fraction of meta-training before pruning starts
    tfinal: float = 0.8  # fraction of meta-training at which the budget reaches target_r per layer
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1


@PEFT_METHODS.register("adalora", AdaLoRAConfig)
class AdaLoRA(LowRankMethod):
    rank_key = "peft.init_r"

    def __init__(self, cfg: AdaLoRAConfig, model):
        require(cfg.init_r >= 1, "peft.init_r", f"must be >= 1, got {cfg.init_r}")
        require(1 <= cfg.target_r <= cfg.init_r, "peft.target_r", f"must be in 1..init_r={cfg.init_r}, got {cfg.target_r}")
        require(0 <= cfg.tinit <= cfg.tfinal <= 1, "peft.tinit", f"need 0 <= tinit <= tfinal <= 1 (fractions of "
                f"meta-training), got tinit={cfg.tinit}, tfinal={cfg.tfinal}")
        for key in ("beta1", "beta2"):
            require(0 <= getattr(cfg, key) < 1, f"peft.{key}", f"must be in [0, 1), got {getattr(cfg, key)}")
        require(cfg.orth_reg_weight >= 0, "peft.orth_reg_weight", f"must be >= 0, got {cfg.orth_reg_weight}")
        super().__init__(cfg, model)
        scale = cfg.alpha / cfg.init_r

        def adalora_linear(params: dict, x: mx.array) -> mx.array:
            out = affine(params, x)
            if "ada_p" in params:
                out = out + scale * (((x @ params["ada_p"]) * (params["ada_lambda"] * params["ada_mask"])) @ params["ada_q"])
            return out

        self.model = model.with_linear(adalora_linear)
        self.paths: list = []
        self.smoothed: dict = {}
        self.uncertainty: dict = {}

    def frozen(self, backbone: dict) -> dict:
        self.paths = [p for p, _ in self.target_layers(backbone)]
        masks: dict = {}
        for path in self.paths:
            set_in(masks, path, {"ada_mask": mx.ones((self.cfg.init_r,))})
        return merge(super().frozen(backbone), masks)

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
        for path in self.paths:
            p, q = get_in(adapted, path)["ada_p"], get_in(adapted, path)["ada_q"]
            eye = mx.eye(p.shape[1])
            total = total + mx.sum(mx.square(p.T @ p - eye)) + mx.sum(mx.square(q @ q.T - eye))
        return self.cfg.orth_reg_weight * total

    def budget(self, step: int, num_iterations: int) -> int:
        """Active triplets over all layers after ``step`` meta-iterations (the cubic schedule)."""
        layers = len(self.paths)
        start, end = layers * self.cfg.init_r, layers * self.cfg.target_r
        t_init, t_final = round(self.cfg.tinit * num_iterations), round(self.cfg.tfinal * num_iterations)
        if step <= t_init:
            return start
        if step >= t_final:
            return end
        remaining = 1 - (step - t_init) / (t_final - t_init)
        return end + int((start - end) * remaining**3)

    def after_meta_step(self, meta_weights: dict, meta_grads: dict, frozen: dict, iteration: int,
                        num_iterations: int) -> dict:
        c = self.cfg
        scores = []
        for path in self.paths:
            weights, grads, name = get_in(meta_weights, path), get_in(meta_grads, path), path_name(path)
            triplet = 0.0
            for factor in FACTORS:
                sensitivity = mx.abs(weights[factor] * grads[factor])
                previous = self.smoothed.get((name, factor), mx.zeros_like(sensitivity))
                smoothed = c.beta1 * previous + (1 - c.beta1) * sensitivity
                uncertainty = (c.beta2 * self.uncertainty.get((name, factor), mx.zeros_like(sensitivity))
                               + (1 - c.beta2) * mx.abs(sensitivity - smoothed))
                self.smoothed[(name, factor)], self.uncertainty[(name, factor)] = smoothed, uncertainty
                score = smoothed * uncertainty
                triplet = triplet + {"ada_p": lambda s: s.mean(axis=0), "ada_lambda": lambda s: s,
                                     "ada_q": lambda s: s.mean(axis=1)}[factor](score)
            scores.append(triplet)
        # Evaluate the moving averages now: left lazy, each step would stack another graph level on the last
        # (found in a full-mode run: gigabytes of graph before pruning began, then one very slow evaluation).
        mx.eval(self.smoothed, self.uncertainty)
        masks = np.stack([np.array(get_in(frozen, p)["ada_mask"]) for p in self.paths])
        budget = self.budget(iteration + 1, num_iterations)
        if masks.sum() <= budget:
            return frozen
        ranked = np.where(masks > 0, np.stack([np.array(s) for s in scores]), -np.inf).ravel()
        keep = np.zeros(ranked.size, dtype=np.float32)
        keep[np.argsort(-ranked, kind="stable")[:budget]] = 1.0
        updates: dict = {}
        for path, mask in zip(self.paths, keep.reshape(masks.shape)):
            set_in(updates, path, {"ada_mask": mx.array(mask)})
        return merge(frozen, updates)

    def first_keepable_iteration(self, num_iterations: int) -> int:
        # After this iteration's pruning the budget is target_r per layer: an earlier, larger model is not AdaLoRA's
        # result, however well it validates.
        return max(0, round(self.cfg.tfinal * num_iterations) - 1)

    def report(self, frozen: dict) -> dict:
        ranks = {path_name(p): int(np.array(get_in(frozen, p)["ada_mask"]).sum()) for p in self.paths}
        return {"final_rank_per_layer": ranks, "final_total_rank": sum(ranks.values()),
                "init_r": self.cfg.init_r, "target_r": self.cfg.target_r}


def orthonormal_columns(key: mx.array, rows: int, columns: int) -> mx.array:
    q, _ = mx.linalg.qr(mx.random.normal((rows, columns), key=key), stream=mx.cpu)
    return q[:, :columns]
