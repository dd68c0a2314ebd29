"""What several test files share: paths, in-process composition as the runners compose, and the runner's CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from metapeft.config import register_configs

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "conf")


def compose_config(*overrides: str, config_name: str = "config", return_hydra_config: bool = False):
    """Compose the runner's config in-process, as ``python runners/run.py OVERRIDES`` would
    (``config_name="transfer_study"``: as ``runners/transfer.py`` would, once ``metapeft.transfer`` is imported)."""
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return compose(config_name=config_name, overrides=["progress=false", *overrides],
                       return_hydra_config=return_hydra_config)


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python runners/run.py ARGS`` from the repository root, output captured."""
    return subprocess.run([sys.executable, "runners/run.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def tiny_bert(directory: Path) -> Path:
    """A randomly initialized two-layer BERT (hidden 16) in the Hugging Face layout, with a character-level WordPiece
    tokenizer: what ``model=hf_encoder model.path=DIR`` reads, small enough for the default test run."""
    import json
    import string

    import mlx.core as mx
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    from metapeft.models.hf_encoder import HFEncoder, HFEncoderConfig, to_hf_names

    directory.mkdir(parents=True, exist_ok=True)
    letters = string.ascii_lowercase + string.digits
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters,
                                          *(f"##{c}" for c in letters)])}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 16, "num_hidden_layers": 2,
              "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64,
              "vocab_size": len(vocab), "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
              "pad_token_id": 0, "initializer_range": 0.2}
    (directory / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(directory / "model.safetensors"), {"placeholder": mx.zeros((1,))})
    model = HFEncoder(HFEncoderConfig(path=str(directory)), None, 2)
    mx.save_safetensors(str(directory / "model.safetensors"), to_hf_names(model.init(mx.random.key(0))))
    return directory


def text_classes(num_classes: int = 15, per_class: int = 20, seed: int = 0) -> dict[str, list[str]]:
    """label -> texts: each class writes words from its own few letters, so a text's class can be learned."""
    import numpy as np

    rng = np.random.default_rng(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyz")
    classes = {}
    for c in range(num_classes):
        letters = rng.choice(alphabet, size=4, replace=False)
        classes[f"class{c}"] = [" ".join("".join(rng.choice(letters, size=rng.integers(2, 5)))
                                          for _ in range(rng.integers(1, 4))) for _ in range(per_class)]
    return classes


def write_text_csv(path: Path, classes: dict[str, list[str]]) -> Path:
    import pandas as pd

    rows = [{"text": t, "label": label} for label, texts in classes.items() for t in texts]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def cifar100_archive(root: Path, train_per_class: int = 4, test_per_class: int = 2, seed: int = 0) -> Path:
    """``root/cifar-100-python/{train,test,meta}`` in the public archive's layout and pickle format (dicts with
    'data' (n, 3072) uint8 stored channel-planar, 'fine_labels', 'coarse_labels', 'filenames', 'batch_label';
    meta's label names), with random images: the 100 classes' real names, so the shipped splits select them.
    Each image's top-left pixel is pure red, for a test of the channel order."""
    import json
    import pickle

    import numpy as np

    fine_to_coarse = json.loads((REPO / "metapeft" / "tasks" / "splits" / "cifar100_classes.json").read_text())[
        "fine_to_coarse"]
    fine_names, coarse_names = sorted(fine_to_coarse), sorted(set(fine_to_coarse.values()))
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for part, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = np.repeat(np.arange(100), per_class)
        planes = rng.integers(0, 256, size=(len(fine), 3, 32, 32), dtype=np.uint8)
        planes[:, :, 0, 0] = [255, 0, 0]
        data = {"batch_label": f"{part} batch 1 of 1", "filenames": [f"img_{i}.png" for i in range(len(fine))],
                "fine_labels": fine.tolist(),
                "coarse_labels": [coarse_names.index(fine_to_coarse[fine_names[f]]) for f in fine],
                "data": planes.reshape(len(fine), 3072)}
        (folder / part).write_bytes(pickle.dumps(data, protocol=2))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": fine_names,
                                                "coarse_label_names": coarse_names}, protocol=2))
    return root


def mini_imagenet_folder(root: Path, classes: tuple[int, int, int] = (6, 5, 5), per_class: int = 6,
                         size: int = 20) -> Path:
    """``root/images/*.jpg`` and ``root/{train,val,test}.csv`` (``filename,label``, WordNet-like labels) in the
    public miniImageNet layout, with small random JPEGs (the task resizes them)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    label = 0
    for split, count in zip(("train", "val", "test"), classes):
        lines = ["filename,label"]
        for _ in range(count):
            wnid = f"n{label:08d}"
            for i in range(per_class):
                name = f"{wnid}{i + 1:08d}.jpg"
                Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(root / "images" / name)
                lines.append(f"{name},{wnid}")
            label += 1
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def class_folders(root: Path, layout: dict[str, list[str]], per_class: int = 4, size: int = 8) -> Path:
    """``root/<part>/<class>/*.jpg`` for each part and class of ``layout`` (tieredImageNet's layout, and CUB's
    with one part), small random JPEGs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for part, classes in layout.items():
        for name in classes:
            folder = root / part / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return root


def tiny_causal_lm(directory: Path, kind: str = "tiny_llama") -> Path:
    """A small random causal language model from tests/fixtures (``tiny_llama`` or ``tiny_qwen2``, written by
    make_causal_lm_reference.py) with a character-level tokenizer that puts ``<s>`` first: what ``model=causal_lm
    model.path=DIR`` reads."""
    import shutil
    import string

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    directory.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(REPO / "tests" / "fixtures" / kind / name, directory / name)
    letters = string.ascii_lowercase + string.digits
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", *letters, *(f"##{c}" for c in letters)])}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    return directory


def text_tasks(num_examples: int = 10) -> list[dict]:
    """Six named text-to-text tasks over lowercase words (what the character-level tokenizer of
    ``tiny_causal_lm`` reads): three with options (classification), three without (generation)."""
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefgh"), rng.integers(2, 5))) for _ in range(6 * num_examples)]
    rows = []
    for i, word in enumerate(words):
        task = i % 6
        if task == 0:
            rows.append({"task": "has_a", "input": word, "output": "yes" if "a" in word else "no",
                         "options": ["no", "yes"]})
        elif task == 1:
            rows.append({"task": "length", "input": word, "output": str(len(word)), "options": ["2", "3", "4"]})
        elif task == 2:
            rows.append({"task": "first", "input": word, "output": word[0],
                         "options": list("abcdefgh")[:4] if word[0] in "abcd" else list("efgh")})
        elif task == 3:
            rows.append({"task": "reverse", "input": word, "output": word[::-1]})
        elif task == 4:
            rows.append({"task": "double", "input": word, "output": word + word})
        else:
            rows.append({"task": "last", "input": word, "output": word[-1]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
