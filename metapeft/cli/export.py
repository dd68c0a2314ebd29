"""Export a meta-learned adapter for other tools: ``python runners/export.py RUN_DIR --format peft --out DIR``.

For ``model=hf_encoder`` runs with ``peft=lora`` or ``peft=adalora``: ``--format peft`` writes a Hugging Face PEFT
adapter directory (``adapter_config.json``, ``adapter_model.safetensors``); ``--merge`` writes instead a Hugging Face
model directory whose weights carry the meta-learned update. Both add ``head.safetensors``, the meta-learned task head.
See ``metapeft.export`` for the key names and layouts.

    from transformers import AutoModel; from peft import PeftModel
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(BASE_DIR), DIR)
"""
from __future__ import annotations

import argparse
import sys

from metapeft.config import register_configs
from metapeft.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a run directory (or its checkpoint/)")
    parser.add_argument("--format", choices=["peft"], default="peft", help="Hugging Face PEFT (default)")
    parser.add_argument("--out", required=True, help="a new directory to write")
    parser.add_argument("--merge", action="store_true", help="write the backbone with the update merged instead")
    args = parser.parse_args(argv)
    register_configs()
    from metapeft.export import export

    try:
        out = export(args.run, args.out, merge_weights=args.merge)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{'merged model' if args.merge else 'PEFT adapter'} written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
