"""Shared by the text classification families: N-way K-shot episodes over per-split lists of class texts.

A text task holds strings until the run's model tokenizes them (``tokenize``, called once by ``metapeft.build``
with the model's tokenizer, in one batch); from then on episodes are token ids, padded to the longest text of the
corpus, and sampling is that of the image families.

Baselines on raw input use a bag of tokens: each text's token counts over the tokens of its task (``raw_features``),
the text analogue of raw pixels.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from metapeft.errors import ConfigError, require
from metapeft.tasks.classification import SPLITS, ClassImagesTask


class TextClassesTask(ClassImagesTask):
    reads_text = True  # needs a model with ``tokenize`` (model=hf_encoder, model=causal_lm)

    def __init__(self, cfg, class_texts: dict[str, list[list[str]]], class_names: dict[str, list[str]],
                 where: str = "task"):
        """``class_texts``: split -> for each class its texts; ``class_names``: the labels, for messages."""
        for split in SPLITS:
            for name, texts in zip(class_names[split], class_texts[split]):
                require(len(texts) > 0, where, f"class '{name}' ({split} split) has no non-empty text")
        self.class_names = class_names
        super().__init__(cfg, {s: [np.asarray(t, dtype=object) for t in class_texts[s]] for s in SPLITS},
                         input_shape=None)

    def validate(self, shots: Sequence[int]) -> None:
        for split in SPLITS:
            for name, texts in zip(self.class_names[split], self.class_images[split]):
                for k in shots:
                    if len(texts) <= self.cfg.num_query:  # no K at all fits this class
                        raise ConfigError("task.num_query", f"class '{name}' ({split} split) has {len(texts)} "
                                          f"text(s), too few for any K with task.num_query={self.cfg.num_query} "
                                          f"query texts: drop that class from your data, give it at least "
                                          f"{self.cfg.num_query + min(shots)} texts, or lower task.num_query")
                    require(k + self.cfg.num_query <= len(texts), "shots",
                            f"K={k} support + task.num_query={self.cfg.num_query} query texts per class exceed the "
                            f"{len(texts)} texts of class '{name}' ({split} split); valid: K + num_query <= "
                            f"{min(len(t) for s in SPLITS for t in self.class_images[s])}, or drop that class")

    def tokenize(self, model) -> None:
        """Replace every class's texts with token ids (one batch through ``model.tokenize``), padded with the
        model's ``pad_id``."""
        require(not getattr(model, "generates", False), "model", "a classification task needs a task head")
        self.pad_id = model.pad_id
        texts = [str(t) for s in SPLITS for c in self.class_images[s] for t in c]
        ids = model.tokenize(texts)
        bounds = np.cumsum([0, *(len(c) for s in SPLITS for c in self.class_images[s])])
        pieces = iter(ids[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:]))
        self.class_images = {s: [next(pieces) for _ in self.class_images[s]] for s in SPLITS}
        self.input_shape = (ids.shape[1],)
        self.pretraining_images = np.concatenate(self.class_images["train"])

    def raw_features(self, xs, xq) -> tuple[np.ndarray, np.ndarray]:
        """Bags of tokens, (tasks, examples, V) each, over the V distinct tokens of each task (padding left out)."""
        xs, xq = np.asarray(xs), np.asarray(xq)
        both = np.concatenate([xs, xq], axis=1)
        pad = self.pad_id
        vocab = [np.setdiff1d(np.unique(task), [pad]) for task in both]
        width = max(1, max(len(v) for v in vocab))
        bags = np.zeros((*both.shape[:2], width))
        for t, (task, v) in enumerate(zip(both, vocab)):
            index = np.searchsorted(v, task)
            real = (task != pad) & (index < len(v))
            rows = np.broadcast_to(np.arange(task.shape[0])[:, None], task.shape)
            np.add.at(bags[t], (rows[real], index[real]), 1.0)
        return bags[:, : xs.shape[1]], bags[:, xs.shape[1]:]
