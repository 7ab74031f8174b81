"""`gigajax convert from-hf | to-hf`: Hugging Face model directories <-> gigajax checkpoints."""

from __future__ import annotations

import argparse

from gigajax.checkpoint import convert
from gigajax.checkpoint.params import DTYPES
from gigajax.cli.common import no_extra


def _from_hf(args: argparse.Namespace, rest: list[str]) -> int:
    no_extra(rest, "convert from-hf")
    convert.from_hf(args.hf_dir, args.out, args.dtype, args.overwrite, args.ignore_field,
                    report=print)
    return 0


def _to_hf(args: argparse.Namespace, rest: list[str]) -> int:
    no_extra(rest, "convert to-hf")
    convert.to_hf(args.checkpoint, args.out, args.dtype, args.max_shard_size, args.overwrite,
                  args.step, require_checksums=not args.allow_missing_checksums,
                  allow_hint="Pass --allow-missing-checksums to read it anyway, with a warning.",
                  report=print)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add `gigajax convert` and its subcommands; each sets `handler(args, rest) -> exit code`."""
    parser = commands.add_parser(
        "convert", help="Hugging Face import and export: from-hf, to-hf",
        description="Convert between Hugging Face model directories (LLaMA 2/3/3.1/3.2, "
                    "Mistral, Qwen2/2.5, Qwen3, Mixtral, Qwen3-MoE: config.json, safetensors, "
                    "tokenizer) and "
                    "gigajax checkpoints. Outputs are written under a temporary name and "
                    "renamed when complete.")
    tools = parser.add_subparsers(dest="convert_command", required=True)
    from_hf = tools.add_parser(
        "from-hf", help="HF model directory -> gigajax params checkpoint",
        description="Read config.json (rope_parameters or rope_scaling), the safetensors "
                    "(sharded with an index, or one file) and the tokenizer files; write a "
                    "params checkpoint that `gigajax.load`, --config and train.init_from take.")
    from_hf.add_argument("hf_dir", help="a directory saved by transformers' save_pretrained")
    from_hf.add_argument("--out", required=True, help="new directory for the params checkpoint")
    from_hf.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                         help="dtype of the stored params (default float32)")
    from_hf.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    from_hf.add_argument("--ignore-field", action="append", default=[], metavar="KEY",
                         help="accept a config.json field gigajax does not know (after checking "
                              "that it does not change the model); repeatable")
    from_hf.set_defaults(handler=_from_hf)
    to_hf = tools.add_parser(
        "to-hf", help="gigajax checkpoint -> HF model directory",
        description="Write config.json (with the run's RoPE scaling), safetensors shards with an "
                    "index and the tokenizer files, which transformers loads with no gigajax "
                    "code.")
    to_hf.add_argument("checkpoint", help="a training workdir, a step directory or a params "
                                          "checkpoint")
    to_hf.add_argument("--out", required=True, help="new directory for the HF model")
    to_hf.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16",
                       help="dtype of the written tensors (default bfloat16)")
    to_hf.add_argument("--max-shard-size", default="5GB",
                       help="largest safetensors file, e.g. 5GB, 500MB (default 5GB)")
    to_hf.add_argument("--step", type=int, help="which checkpoint of a workdir (default: latest)")
    to_hf.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    to_hf.add_argument("--allow-missing-checksums", action="store_true",
                       help="read a checkpoint without checksums.json, with a warning")
    to_hf.set_defaults(handler=_to_hf)
