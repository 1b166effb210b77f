"""peftlab generate [CONFIG] [key=value ...] [--run DIR | --adapter DIR] --prompt TEXT ..."""

from __future__ import annotations

import sys

from ._args import add_config_arguments

NAME = "generate"
HELP = "generate answers with the base model, an adapter, or a finished run (same template as training)"


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--run", help="a run directory: its config.yaml, template and adapter/ or model/")
    p.add_argument("--adapter", help="an adapter directory (peftlab or Hugging Face PEFT)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); '-' reads lines from stdin")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lookup", type=int, default=0, metavar="N",
                   help="prompt-lookup speculative decoding: draft up to N tokens from the prompt and the text so "
                        "far, check them in one forward (greedy only, one prompt at a time; faster when answers "
                        "copy from the prompt). 0 = off")


def run(args) -> int:
    from ..errors import ConfigError
    from ..eval.generate import generate, load_for_generation

    prompts = []
    for p in args.prompt:
        prompts.extend(line.rstrip("\n") for line in sys.stdin if line.strip()) if p == "-" else prompts.append(p)
    if not prompts:
        raise ConfigError("give at least one --prompt TEXT (or --prompt - to read prompts from stdin)")
    model, tok, encoder, _ = load_for_generation(args.run, args.adapter, args.args)
    answers = generate(model, tok, encoder, prompts, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size, seed=args.seed,
                       lookup=args.lookup)
    for prompt, answer in zip(prompts, answers):
        if len(prompts) > 1:
            print(f"### {prompt}")
        print(answer)
    return 0
