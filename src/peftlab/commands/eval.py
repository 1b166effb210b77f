"""peftlab eval [CONFIG] [key=value ...] [--run DIR | --adapter DIR] [--limit N] ...

Scores a model on the held-out split of its data config (``data.eval_split`` or
``data.eval_path``): eval loss and perplexity, then generation metrics (exact match, BLEU-4,
ROUGE-1/2/L, long-answer accuracy). With ``--run`` the run's own config, template, data split
and adapter (or full model) are used, so the held-out set is the one the run never trained on.
Writes ``metrics.json`` and ``predictions.jsonl`` (prompt, reference, prediction, scores).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ._args import add_config_arguments

NAME = "eval"
HELP = "loss, perplexity, BLEU-4, ROUGE and exact match on held-out data (a run, an adapter or a base model)"


def add_arguments(p) -> None:
    from ..eval.harness import EvalConfig

    d = EvalConfig()
    add_config_arguments(p)
    p.add_argument("--run", help="a run directory: its config.yaml, data split and adapter/ or model/")
    p.add_argument("--adapter", help="an adapter directory (peftlab or Hugging Face PEFT) on the configured base")
    p.add_argument("--output", help="where metrics.json and predictions.jsonl go (default: RUN/eval, else runs/eval)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N held-out conversations")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--lookup", type=int, default=d.lookup, metavar="N",
                   help="prompt-lookup speculative decoding for the generation metrics: draft up to N tokens from "
                        "the prompt and the text so far, check them in one forward (greedy only, the same answers). "
                        "It decodes one prompt at a time, trading --batch-size batching for per-prompt speed: "
                        "faster when answers copy from the prompt, slower than batches when they do not. 0 = off")
    p.add_argument("--long-answer-chars", type=int, default=d.long_answer_chars,
                   help="long-answer accuracy counts references longer than this many characters")
    p.add_argument("--loss-batches", type=int, default=None, help="cap the loss pass at this many batches")
    p.add_argument("--no-loss", action="store_true", help="skip eval loss and perplexity")
    p.add_argument("--no-generate", action="store_true", help="skip generation metrics")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")


def run(args) -> int:
    from ..data.dataset import build_datasets
    from ..errors import ConfigError
    from ..eval.generate import load_for_generation
    from ..eval.harness import EvalConfig, evaluate, format_scores, write_eval
    from ..train.runtime import resolve_precision, set_threads

    if args.run and args.adapter:
        raise ConfigError("give --run or --adapter, not both (a run directory already names its adapter)")
    ecfg = EvalConfig(loss=not args.no_loss, loss_batches=args.loss_batches, generate=not args.no_generate,
                      limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed, lookup=args.lookup,
                      long_answer_chars=args.long_answer_chars, prompts=[])
    ecfg.validate()
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    model, tok, _, cfg = load_for_generation(args.run, args.adapter, args.args)
    set_threads(cfg.train.threads)
    data = build_datasets(cfg.data, tok, cfg.train.seed)
    if not data.eval:
        raise ConfigError(
            f"no held-out data to evaluate on (data.path={cfg.data.path!r}, data.eval_split={cfg.data.eval_split}); "
            "set data.eval_split (a fraction or a count) or data.eval_path"
        )
    device = next(model.parameters()).device
    amp = resolve_precision(cfg.train.mixed_precision, device)
    what = f"run {args.run}" if args.run else (f"adapter {args.adapter}" if args.adapter else f"base {cfg.model.name}")
    say(f"peftlab eval: {what}; held-out {len(data.eval)} examples from {cfg.data.path or 'builtin:tasks'}"
        + (f", generating {min(len(data.eval_records), args.limit if args.limit is not None else 10**9)}"
           if ecfg.generate else ""))
    result = evaluate(model, tok, data.encoder, data.eval_records, data.eval, data.collate, ecfg, amp, log=say,
                      pref=cfg.pref)
    out = Path(args.output) if args.output else (Path(args.run) / "eval" if args.run else Path("runs/eval"))
    extra = {"model": cfg.model.name, "method": cfg.peft.method, "run": args.run, "adapter": args.adapter,
             "data": cfg.data.path, "eval": {k: v for k, v in vars(ecfg).items() if k != "prompts"}}
    write_eval(out, result, extra)
    if args.json:
        print(json.dumps(result.metrics))
    else:
        m = result.metrics
        if "eval_loss" in m:
            print(f"eval loss: {m['eval_loss']:.4f}   perplexity: {m['perplexity']:.3f}")
        if "pref_accuracy" in m:
            print(f"preference accuracy: {m['pref_accuracy']:.4f}   margin: {m['pref_margin']:.4f}   rewards chosen: "
                  f"{m['pref_rewards_chosen']:.4f}   rejected: {m['pref_rewards_rejected']:.4f}")
        if "n" in m:
            print(f"generation ({m['n']} answers): {format_scores(m)}")
        print(f"written: {out / 'metrics.json'}, {out / 'predictions.jsonl'}")
    return 0
