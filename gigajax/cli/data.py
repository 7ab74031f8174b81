"""`gigajax data ...` subcommands: train-tokenizer, prepare (token shards), verify (the shards).

train-tokenizer trains a byte-level BPE; prepare writes token shards and a manifest; verify reads
every shard against that manifest.

  gigajax data train-tokenizer --input 'corpus/**/*.txt' --vocab-size 8000 --out tok/tokenizer.json
  gigajax data prepare --input 'data/*.jsonl' --tokenizer tok/tokenizer.json --out data/prepared
  gigajax data prepare --dpo --input pairs.jsonl --tokenizer byte --out data/pairs
  gigajax data verify data/prepared
"""

from __future__ import annotations

import argparse

from gigajax.cli.common import no_extra
from gigajax.data import readers


def _add_reading_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", action="append", required=True, metavar="GLOB",
                        help="file or quoted glob ('data/**/*.jsonl'); repeat for more. "
                             ".jsonl/.json: JSON Lines, .parquet: a column, else plain text "
                             "(one document per file)")
    parser.add_argument("--field", default="text",
                        help="JSON field / Parquet column holding the text (default: text)")
    parser.add_argument("--bad-utf8", choices=readers.BAD_UTF8, default="replace",
                        help="invalid UTF-8: replace with U+FFFD (counted) or reject (error)")
    parser.add_argument("--bad-lines", choices=readers.BAD_LINES, default="error",
                        help="malformed JSON lines / records missing --field: error or skip "
                             "(counted)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_tokenizer(args: argparse.Namespace, rest: list[str]) -> int:
    no_extra(rest, "data")
    from gigajax.data.tokenizer import train_tokenizer

    tok = train_tokenizer(args.input, args.vocab_size, args.out, min_frequency=args.min_frequency,
                          show_progress=not args.no_progress, field=args.field,
                          bad_utf8=args.bad_utf8, bad_lines=args.bad_lines)
    print(f"wrote {tok.spec}: {tok.vocab_size} ids, bos {tok.bos_id}, eos {tok.eos_id}, pad "
          f"{tok.pad_id}, fim prefix/middle/suffix {tok.fim_prefix_id}/{tok.fim_middle_id}/"
          f"{tok.fim_suffix_id}")
    return 0


def _prepare(args: argparse.Namespace, rest: list[str]) -> int:
    no_extra(rest, "data")
    from gigajax.data.prepare import prepare

    prepare(args.input, args.tokenizer, args.out, field=args.field, sft=args.sft,
            val_fraction=args.val_fraction, workers=args.workers, bad_utf8=args.bad_utf8,
            bad_lines=args.bad_lines, min_doc_tokens=args.min_doc_tokens,
            shard_tokens=args.shard_tokens, progress=not args.no_progress, chat=args.chat,
            dpo=args.dpo)
    return 0


def _verify(args: argparse.Namespace, rest: list[str]) -> int:
    no_extra(rest, "data")
    from gigajax.data.verify import verify_prepared

    print(verify_prepared(args.dir, progress=not args.no_progress).summary())
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add `gigajax data` and its subcommands; each sets `handler(args, rest) -> exit code`."""
    data = commands.add_parser("data", help="tokenizers, dataset preparation and checks",
                               description=__doc__.splitlines()[0])
    sub = data.add_subparsers(dest="data_command", required=True)
    train = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer",
                           description="Train a byte-level BPE (specials <|bos|> <|eos|> <|pad|> "
                                       "<|fim_prefix|> <|fim_middle|> <|fim_suffix|> = ids 0-5) "
                                       "and write tokenizer.json.")
    _add_reading_flags(train)
    train.add_argument("--vocab-size", type=int, default=8000, help="ids in all (default 8000)")
    train.add_argument("--min-frequency", type=int, default=2,
                       help="a merge needs a pair seen this often (default 2)")
    train.add_argument("--out", required=True, help="where to write, e.g. tok/tokenizer.json")
    train.set_defaults(handler=_train_tokenizer)
    prep = sub.add_parser("prepare", help="tokenize files into a prepared dataset directory",
                          description="Tokenize documents (EOS after each) into train/validation "
                                      "token shards and a manifest; re-running on unchanged "
                                      "input does nothing.")
    _add_reading_flags(prep)
    prep.add_argument("--tokenizer", required=True,
                      help="'byte', a tokenizer.json path or a SentencePiece .model path")
    prep.add_argument("--out", required=True, help="output directory (new, empty or prepared)")
    prep.add_argument("--sft", action="store_true",
                      help="records are prompt/response or messages: write a loss mask")
    prep.add_argument("--chat", action="store_true",
                      help="records are messages: render them with the tokenizer's chat "
                           "template (tokenizer_config.json); the loss covers assistant turns")
    prep.add_argument("--dpo", action="store_true",
                      help="records are {prompt, chosen, rejected}: preference pairs for "
                           "train.objective=dpo")
    prep.add_argument("--val-fraction", type=float, default=0.01,
                      help="share of documents in the validation split, in [0, 1)")
    prep.add_argument("--workers", type=int, default=None,
                      help="tokenizing processes (default: CPUs, at most one per unit of work)")
    prep.add_argument("--min-doc-tokens", type=int, default=1,
                      help="skip (and count) documents with fewer tokens")
    prep.add_argument("--shard-tokens", type=int, default=100_000_000,
                      help="tokens per shard file (default 100_000_000)")
    prep.set_defaults(handler=_prepare)
    verify = sub.add_parser("verify", help="check every shard of a prepared directory",
                            description="Read every shard of a prepared directory in full: sizes, "
                                        "sha256s, token id ranges, document indexes and loss "
                                        "masks against manifest.json. Exit 0 if all match, 2 "
                                        "naming the first bad shard otherwise.")
    verify.add_argument("dir", metavar="DIR", help="a directory written by `gigajax data prepare`")
    verify.add_argument("--no-progress", action="store_true", help="no progress bar")
    verify.set_defaults(handler=_verify)
