"""Named text-to-text tasks (CrossFit and MetaICL style) for a causal language model (``model=causal_lm``): a JSON
Lines file, one example a line,

    {"task": "sentiment", "input": "a gripping film", "output": "positive", "options": ["negative", "positive"]}
    {"task": "capital", "input": "France", "output": "Paris"}

``options`` (the answer strings, at least two, the output among them) makes a classification task; every example of
a task has them or none does. Tasks, not examples, are split into meta-train / -validation / -test by
``task.val_fraction``, ``task.test_fraction`` and ``task.split_seed`` (the split is recorded in metrics.json). An
episode is one task: K support and ``task.num_query`` query examples of it, drawn without replacement.

Template: the model reads ``input + task.separator`` (after the special tokens its tokenizer puts first, Llama's
``<s>``), then the output's tokens and the end-of-sequence token. The loss is the cross-entropy of the output tokens
and that end token, averaged over them; the prompt is masked. Prompts too long for ``model.max_length`` lose their
first tokens (never the special ones); an output that does not fit is refused.

Scores, one per query, averaged over a task's queries:
- with ``options``: whether the answer's score beats every other option's (a tie counts as wrong), an option's score
  being the mean (``task.option_score=mean``, length-normalized, as MetaICL) or the sum (``sum``) of its tokens'
  log-likelihoods given the prompt (the end token left out);
- without: exact match of the greedy completion, computed in one pass: greedy decoding reproduces the output exactly
  when each of its tokens, and the end token after them, is the most likely one given the tokens before it
  (tested against a decoding loop).
Tasks drawn more than once are one unit for the confidence intervals (``metapeft.stats``): the tasks are the
independent units.

Arrays: an example is its candidates, (O, L) token ids right-padded with -1 (support: the answer alone, O = 1), and
the targets (O, L + 1): at each position the next token where it is scored, else -1, then one column that says
whether the candidate is the answer (1), another option (0) or padding (-1).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

from metapeft.backend import mx
from metapeft.errors import ConfigError, require
from metapeft.registry import TASKS
from metapeft.tasks.base import Episodes, TaskClasses, TaskConfig, TaskFamily
from metapeft.tasks.classification import SPLITS

PAD = -1
KEYS = ("task", "input", "output")


class OptionScore(StrEnum):
    mean = "mean"  # mean log-likelihood per token: length-normalized
    sum = "sum"


@dataclass
class TextTasksConfig(TaskConfig):
    name: str = "text_tasks"
    path: Optional[str] = None  # the JSON Lines file
    num_query: int = 4  # query examples per task
    default_inner_lr: float = 0.1
    default_meta_batch_size: int = 2
    val_fraction: float = 0.2  # of the tasks
    test_fraction: float = 0.3
    split_seed: int = 0
    separator: str = "\n"  # between the input and the output
    demo_separator: str = "\n\n"  # after each demonstration of the in-context baseline
    option_score: OptionScore = OptionScore.mean


class Example(NamedTuple):
    input: str
    output: str
    options: tuple[str, ...] | None


def read_tasks(path: Path) -> dict[str, list[Example]]:
    """task name -> its examples, from the JSON Lines file; a bad line is refused with its number."""
    tasks: dict[str, list[Example]] = {}
    with_options: dict[str, bool] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError("task.path", f"{where} is not JSON ({error.msg})") from error
        require(isinstance(row, dict), "task.path", f"{where} is not a JSON object")
        for key in KEYS:
            require(isinstance(row.get(key), str), "task.path", f"{where} lacks '{key}' (a string); each line needs "
                    f"{list(KEYS)} and, for classification, 'options'")
        options = row.get("options")
        if options is not None:
            require(isinstance(options, list) and all(isinstance(o, str) for o in options) and len(set(options)) >= 2
                    and len(set(options)) == len(options), "task.path",
                    f"{where}: 'options' must be a list of at least two distinct strings, got {options!r}")
            require(row["output"] in options, "task.path",
                    f"{where}: the output {row['output']!r} is not among its options {options}")
        name = row["task"]
        has = options is not None
        require(with_options.setdefault(name, has) == has, "task.path", f"{where}: task '{name}' mixes examples with "
                "and without 'options'; give every example of a task its options, or none")
        tasks.setdefault(name, []).append(Example(row["input"], row["output"], tuple(options) if has else None))
    require(tasks, "task.path", f"{path} holds no examples")
    return tasks


def split_tasks(names: list[str], cfg: TextTasksConfig) -> dict[str, list[str]]:
    """The tasks split into meta-train / -val / -test by fractions, seeded; each split gets at least one."""
    require(0 < cfg.val_fraction < 1 and 0 < cfg.test_fraction < 1 and cfg.val_fraction + cfg.test_fraction < 1,
            "task.val_fraction", f"val_fraction and test_fraction must each be in (0, 1) and sum below 1, got "
            f"{cfg.val_fraction} and {cfg.test_fraction}")
    require(len(names) >= 3, "task.path", f"{cfg.path} holds {len(names)} task(s) ({names}); meta-train, "
            "meta-validation and meta-test each need at least one")
    order = [names[i] for i in np.random.default_rng(cfg.split_seed).permutation(len(names))]
    n_test = max(1, round(cfg.test_fraction * len(names)))
    n_val = max(1, round(cfg.val_fraction * len(names)))
    require(n_test + n_val < len(names), "task.test_fraction", f"{len(names)} tasks leave none for meta-training "
            f"with {n_test} test and {n_val} validation tasks; lower task.test_fraction or task.val_fraction")
    return {"test": sorted(order[:n_test]), "val": sorted(order[n_test: n_test + n_val]),
            "train": sorted(order[n_test + n_val:])}


class TokenizedTask(NamedTuple):
    """One task's examples as arrays: every candidate (examples, O, L) with its targets (examples, O, L + 1), and
    the answer alone (examples, 1, L) / (examples, 1, L + 1), what support sets train on."""

    candidates: np.ndarray
    targets: np.ndarray
    answer: np.ndarray
    answer_targets: np.ndarray


@TASKS.register("text_tasks", TextTasksConfig)
class TextTasks(TaskFamily):
    reads_text = True
    generative = True  # the model's output is next-token logits (model=causal_lm as a language model)
    metric_name = "accuracy"  # option accuracy, or exact match where a task has no options
    higher_is_better = True
    output_dim = None
    input_shape = None  # (L,) once tokenized
    pretraining_outputs = 1  # unused: the language model brings its own weights

    def __init__(self, cfg: TextTasksConfig):
        require(cfg.path is not None, "task.path", "give your tasks: task.path=FILE.jsonl, one JSON object a line "
                "with task, input, output and (for classification) options")
        path = Path(cfg.path).expanduser()
        require(path.is_file(), "task.path", f"{path} is not a file")
        require(cfg.num_query >= 1, "task.num_query", f"must be >= 1, got {cfg.num_query}")
        self.cfg = cfg
        self.examples = read_tasks(path)
        self.split = split_tasks(sorted(self.examples), cfg)
        self.tasks: dict[str, list[TokenizedTask]] = {}

    def validate(self, shots: Sequence[int]) -> None:
        for split in SPLITS:
            for name in self.split[split]:
                have, need = len(self.examples[name]), max(shots) + self.cfg.num_query
                require(have >= need, "shots", f"task '{name}' ({split} split) has {have} examples, fewer than K="
                        f"{max(shots)} support + task.num_query={self.cfg.num_query} query examples; give it at "
                        f"least {need}, lower K or task.num_query, or drop the task from {self.cfg.path}")

    # --- text to token ids (once, with the run's model) -----------------------------------------------------------

    def tokenize(self, model) -> None:
        """Every example's candidates as token ids and targets, padded to the longest of the file."""
        require(getattr(model, "generates", False), "model", "task=text_tasks scores text with a language model: "
                "use model=causal_lm model.path=DIR")
        self.eos = model.eos_id
        self.leading = len(model.encode([""], special_tokens=True)[0])  # special tokens the tokenizer puts first
        self.demo_separator = model.encode([self.cfg.demo_separator], special_tokens=False)[0]
        self.context_length = model.context_length
        max_length = model.cfg.max_length
        names = [n for s in SPLITS for n in self.split[s]]
        examples = [e for n in names for e in self.examples[n]]
        prompts = model.encode([e.input + self.cfg.separator for e in examples], special_tokens=True)
        answers = sorted({a for e in examples for a in (e.options or (e.output,))})
        answer_ids = dict(zip(answers, model.encode(answers, special_tokens=False)))
        longest = max(len(answer_ids[a]) + 1 for a in answers)
        require(self.leading + 1 + longest <= max_length, "model.max_length", f"must hold the special tokens, one "
                f"prompt token and the longest output with its end token: at least {self.leading + 1 + longest}, "
                f"got {max_length}")
        rows = []
        for example, prompt in zip(examples, prompts):
            require(len(prompt) > self.leading, "task.path", f"task '{self.task_of(example)}': the input "
                    f"{example.input!r} and task.separator {self.cfg.separator!r} give the model no token to read")
            options = example.options or (example.output,)
            rows.append([self.sequence(prompt, answer_ids[o], max_length) for o in options])
        self.truncated_prompts = sum(len(p) + len(answer_ids[e.output]) + 1 > max_length
                                     for e, p in zip(examples, prompts))
        width = max(len(x) for row in rows for x, _ in row)
        num_options = max(len(row) for row in rows)
        arrays = iter(self.as_arrays(row, (e.options or (e.output,)).index(e.output), width, num_options)
                      for row, e in zip(rows, examples))
        self.tasks = {n: TokenizedTask(*(np.stack(part) for part in zip(*(next(arrays) for _ in self.examples[n]))))
                      for n in names}
        self.input_shape = (width,)

    def sequence(self, prompt: list[int], answer: list[int], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Prompt + answer + end token as ids, and the targets: the next token where the answer or the end token
        is predicted, -1 elsewhere. A prompt too long loses its first tokens after the special ones."""
        room = max_length - len(answer) - 1
        if len(prompt) > room:
            prompt = prompt[: self.leading] + prompt[len(prompt) - (room - self.leading):]
        ids = np.array([*prompt, *answer, self.eos], dtype=np.int32)
        targets = np.full(len(ids), PAD, dtype=np.int32)
        targets[len(prompt) - 1: -1] = ids[len(prompt):]
        return ids, targets

    def task_of(self, example: Example) -> str:
        return next(name for name, examples in self.examples.items() if example in examples)

    @staticmethod
    def as_arrays(row: list, answer: int, width: int, num_options: int) -> tuple:
        """An example's candidates padded to (O, width) and targets (O, width + 1) with the answer column."""
        ids = np.full((num_options, width), PAD, dtype=np.int32)
        targets = np.full((num_options, width + 1), PAD, dtype=np.int32)
        for o, (x, y) in enumerate(row):
            ids[o, : len(x)], targets[o, : len(y)] = x, y
            targets[o, -1] = int(o == answer)
        gold_targets = targets[answer: answer + 1].copy()
        return ids, targets, ids[answer: answer + 1], gold_targets

    # --- episodes -------------------------------------------------------------------------------------------------

    def task_order(self, split: str, num_tasks: int, rng: np.random.Generator) -> np.ndarray:
        """Which tasks (indices in the split): every task once in random order, again while more are needed."""
        n = len(self.split[split])
        return np.concatenate([rng.permutation(n) for _ in range(-(-num_tasks // n))])[:num_tasks]

    def sample_with_classes(self, split: str, num_tasks: int, shots: int,
                            rng: np.random.Generator) -> tuple[Episodes, TaskClasses]:
        require(shots >= 1, "shots", f"K must be >= 1, got {shots}")
        order = self.task_order(split, num_tasks, rng)
        parts = []
        for index in order:
            task = self.tasks[self.split[split][index]]
            chosen = rng.permutation(len(task.answer))[: shots + self.cfg.num_query]
            support, query = chosen[:shots], chosen[shots:]
            parts.append((task.answer[support], task.answer_targets[support], task.candidates[query],
                          task.targets[query]))
        xs, ys, xq, yq = (mx.array(np.stack(p)) for p in zip(*parts))
        return Episodes(xs, ys, xq, yq), TaskClasses(order[:, None], order[:, None])

    def sample(self, split: str, num_tasks: int, shots: int, rng: np.random.Generator) -> Episodes:
        return self.sample_with_classes(split, num_tasks, shots, rng)[0]

    def pretraining_batch(self, rng: np.random.Generator, batch_size: int) -> tuple[mx.array, mx.array]:
        """Answers of meta-train examples (at most 32: a language model's logits are large), as sample inputs."""
        answers = np.concatenate([self.tasks[n].answer[:, 0] for n in self.split["train"]])
        targets = np.concatenate([self.tasks[n].answer_targets for n in self.split["train"]])
        picks = rng.choice(len(answers), min(batch_size, 32, len(answers)), replace=False)
        return mx.array(answers[picks]), mx.array(targets[picks])

    def report(self) -> dict:
        return {"split": self.split, "truncated_prompts": self.truncated_prompts,
                "examples_per_task": {n: len(e) for n, e in self.examples.items()},
                "options": "accuracy of the best-scoring option (ties count as wrong), scored by the "
                           f"{self.cfg.option_score} log-likelihood of its tokens",
                "no_options": "exact match of the greedy completion"}

    # --- loss and score -------------------------------------------------------------------------------------------

    def loss(self, logits: mx.array, targets: mx.array) -> mx.array:
        """Cross-entropy of the answers' tokens and end tokens, averaged over them."""
        tokens, answer = targets[..., :-1], targets[..., -1:]
        counted = ((tokens >= 0) & (answer == 1)).astype(mx.float32)
        return (token_nll(logits, tokens) * counted).sum() / mx.maximum(counted.sum(), 1.0)

    def metric(self, logits: mx.array, targets: mx.array) -> mx.array:
        """The mean over queries of option accuracy (a task with options) or exact match (without)."""
        tokens, answer = targets[..., :-1], targets[..., -1]
        scored = tokens >= 0
        # the scored positions are contiguous and the end token is the last: a position is the option's where the
        # next one is scored too (not by comparing positions, which MLX 0.32's vmap broadcasts wrongly)
        in_option = (scored & mx.concatenate([scored[..., 1:], mx.zeros_like(scored[..., :1])], axis=-1))
        in_option = in_option.astype(mx.float32)
        log_likelihood = -(token_nll(logits, tokens) * in_option).sum(axis=-1)
        if self.cfg.option_score == OptionScore.mean:
            log_likelihood = log_likelihood / mx.maximum(in_option.sum(axis=-1), 1.0)
        others = mx.where(answer == 0, log_likelihood, -mx.inf).max(axis=-1)
        best_is_answer = (mx.where(answer == 1, log_likelihood, -mx.inf).max(axis=-1) > others)
        greedy = mx.all((mx.argmax(logits, axis=-1) == tokens) | ~scored, axis=-1)
        exact = mx.all(greedy | (answer != 1), axis=-1)
        has_options = (answer >= 0).sum(axis=-1) > 1
        return mx.where(has_options, best_is_answer, exact).astype(mx.float32).mean()

    # --- the in-context baseline's inputs -------------------------------------------------------------------------

    def in_context(self, xs: np.ndarray, xq: np.ndarray, yq: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each query's candidates after the task's K support examples as demonstrations (each its prompt and answer,
        then ``task.demo_separator``; the special tokens only once, first), keeping the last demonstrations that fit
        the model's context: token ids (tasks, Q, O, L'), targets (tasks, Q, O, L' + 1) and how many demonstrations
        each task's context holds."""
        lead, contexts, used = self.leading, [], []
        for task_support, task_query in zip(xs, xq):
            demos = []
            for example in task_support[:, 0]:
                real = example[example >= 0][:-1]  # without its end token
                demos.append([*real[lead:], *self.demo_separator])
            longest_query = int((task_query >= 0).sum(axis=-1).max())
            context: list[int] = []
            kept = 0
            for demo in reversed(demos):  # the last demonstrations that fit
                if len(demo) + len(context) + longest_query > self.context_length:
                    break
                context, kept = [*demo, *context], kept + 1
            contexts.append(context)
            used.append(kept)
        width = max(len(c) for c in contexts) + xq.shape[-1]
        ids = np.full((*xq.shape[:-1], width), PAD, dtype=np.int32)
        targets = np.full((*yq.shape[:-1], width + 1), PAD, dtype=np.int32)
        targets[..., -1] = yq[..., -1]
        for t, context in enumerate(contexts):
            n = len(context)
            query = xq[t]
            ids[t, ..., :lead] = query[..., :lead]
            ids[t, ..., lead: lead + n] = np.where((query[..., :1] >= 0), np.array(context, dtype=np.int32), PAD)
            ids[t, ..., lead + n: n + xq.shape[-1]] = query[..., lead:]
            targets[t, ..., n: n + xq.shape[-1]] = yq[t, ..., :-1]
        return ids, targets, np.array(used)


def token_nll(logits: mx.array, tokens: mx.array) -> mx.array:
    """-log p(token) at each position (padding: any value; callers mask it)."""
    picked = mx.take_along_axis(logits, mx.maximum(tokens, 0)[..., None], axis=-1).squeeze(-1)
    return mx.logsumexp(logits, axis=-1) - picked
