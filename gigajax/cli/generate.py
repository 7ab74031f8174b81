"""`gigajax generate`: continue prompts with a trained model, streaming to the terminal.

  gigajax generate --checkpoint runs/tiny --prompt "def " --max-new-tokens 64
  gigajax generate --checkpoint hf/llama --prompts-file prompts.jsonl --strategy beam \
      --num-beams 4 --output answers.jsonl
  gigajax generate --checkpoint runs/sft --prompt "Sort 3 1 2" --chat --mesh tensor=2,fsdp=2

One prompt streams its text as it is generated; several (a prompts file, or --prompt given
more than once) run as left-padded batches of --batch-size and print in order. Every flag maps
onto `LM.generate` / `LM.complete` (`gigajax/api.py`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gigajax import api
from gigajax.cli.common import split_overrides
from gigajax.errors import GigajaxError
from gigajax.infer.generate import STRATEGIES, options_for


def read_prompts(path: str, chat: bool) -> list:
    """A prompts file: JSON Lines of {"prompt": text} (or {"messages": [...]} with --chat), or
    plain text with one prompt per line (blank lines skipped)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not path.endswith((".jsonl", ".json")):
        return [line for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise GigajaxError(f"{path}:{number}: not JSON ({e.msg}).") from None
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            prompts.append(record["prompt"])
        elif chat and isinstance(record, dict) and isinstance(record.get("messages"), list):
            prompts.append(record["messages"])
        else:
            wanted = '{"prompt": "..."} or {"messages": [...]}' if chat else '{"prompt": "..."}'
            raise GigajaxError(f"{path}:{number}: each line is {wanted}.")
    return prompts


def _options(args: argparse.Namespace) -> dict:
    """The generation options given on the command line (None: not given)."""
    names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed",
             "num_beams", "length_penalty", "penalty_alpha", "prefill_chunk")
    options = {name: getattr(args, name) for name in names}
    if args.early_stopping is not None:
        options["early_stopping"] = {"true": True, "false": False}.get(args.early_stopping,
                                                                        args.early_stopping)
    if args.token_healing:
        options["token_healing"] = args.token_healing
    return options


def _generate(args: argparse.Namespace, rest: list[str]) -> int:
    overrides = split_overrides(rest)
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += read_prompts(args.prompts_file, args.chat)
    if not prompts:
        raise GigajaxError("give --prompt TEXT or --prompts-file FILE.")
    if args.batch_size < 1:
        raise GigajaxError(f"--batch-size {args.batch_size}: give an integer >= 1.")
    options_for(args.strategy, max_new_tokens=args.max_new_tokens, **_options(args))  # first
    lm = api.load(args.checkpoint, *overrides, step=args.step, mesh=args.mesh)
    common = dict(strategy=args.strategy, chat=args.chat, stop_at_eos=not args.no_eos_stop,
                  stop=args.stop or (), **_options(args))
    records = []
    if len(prompts) == 1 and not args.no_stream:
        shown = [] if args.chat else [prompts[0]]  # the prompt, echoed with the first text

        def stream(_row: int, text: str) -> None:
            print("".join(shown) + text, end="", flush=True)
            shown.clear()

        outs = lm.complete(prompts, args.max_new_tokens, **common, on_text=stream)
        print("".join(shown))
    else:
        outs = []
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start:start + args.batch_size]
            done = lm.complete(batch, args.max_new_tokens, **common)
            for k, (prompt, out) in enumerate(zip(batch, done, strict=True)):
                echo = prompt if isinstance(prompt, str) and not args.chat else ""
                print(f"--- prompt {start + k + 1} ({out.stop}) ---\n{echo}{out.text}")
            outs += done
    for prompt, out in zip(prompts, outs, strict=True):
        records.append({"prompt": prompt, "text": out.text, "tokens": out.tokens.tolist(),
                        "stop": out.stop})
    if args.output:
        Path(args.output).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                             for r in records), encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add `gigajax generate`; it sets `handler(args, rest) -> exit code`."""
    g = commands.add_parser("generate", help="continue prompts with a trained model",
                            description=__doc__.splitlines()[0] + " Extra --config.a.b=v "
                            "overrides change how the model runs (RoPE scaling, dtype).")
    g.add_argument("--checkpoint", required=True,
                   help="a training workdir (its latest checkpoint), a step directory, a "
                        "params checkpoint, or a Hugging Face model directory")
    g.add_argument("--step", type=int, help="which checkpoint of a workdir (default: latest)")
    g.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    g.add_argument("--prompts-file", help="prompts: JSON Lines of {\"prompt\": ...} "
                                          "({\"messages\": [...]} with --chat), or one per line")
    g.add_argument("--chat", action="store_true",
                   help="apply the tokenizer's chat template (the prompt as a user message)")
    g.add_argument("--strategy", default="greedy", choices=STRATEGIES,
                   help="how the next token is chosen (default greedy)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    g.add_argument("--temperature", type=float, help="sample: logits / temperature")
    g.add_argument("--top-k", type=int,
                   help="sample: keep the k most likely tokens; contrastive: candidates (4)")
    g.add_argument("--top-p", type=float, help="sample: nucleus, in (0, 1]")
    g.add_argument("--min-p", type=float, help="sample: drop tokens below min-p x the best")
    g.add_argument("--repetition-penalty", type=float, help="greedy, sample: > 0 (CTRL's)")
    g.add_argument("--seed", type=int, help="sample: the same seed gives the same text")
    g.add_argument("--num-beams", type=int, help="beam: hypotheses kept (default 4)")
    g.add_argument("--length-penalty", type=float, help="beam: score / length**p (default 1)")
    g.add_argument("--early-stopping", choices=("true", "false", "never"),
                   help="beam: when to stop (transformers' meaning; default false)")
    g.add_argument("--penalty-alpha", type=float,
                   help="contrastive: degeneration penalty in [0, 1] (default 0.6)")
    g.add_argument("--token-healing", type=int, nargs="?", const=1, default=0,
                   help="back the prompt up by N tokens (default 1) and spell them again")
    g.add_argument("--stop", action="append", help="a stop string (repeat for several)")
    g.add_argument("--no-eos-stop", action="store_true", help="go on past the EOS token")
    g.add_argument("--prefill-chunk", type=int, help="prompt tokens per prefill step (512)")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
    g.add_argument("--mesh", help="shard the weights, e.g. tensor=2,fsdp=2 (default: one "
                                  "device)")
    g.add_argument("--no-stream", action="store_true", help="print when done, not as it goes")
    g.add_argument("--output", help="write JSON Lines {prompt, text, tokens, stop} here")
    g.set_defaults(handler=_generate)
