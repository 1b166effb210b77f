"""peftlab merge (--adapter DIR | --run RUN_DIR) --out DIR [--dtype D] [key=value ...]"""

from __future__ import annotations

from ._args import export_out

NAME = "merge"
HELP = "merge an adapter into its base and export a plain Hugging Face model directory"


def add_arguments(p) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. model.name=DIR for an adapter that does not record its base")
    p.add_argument("--adapter", help="an adapter directory (peftlab or Hugging Face PEFT)")
    p.add_argument("--run", help="a run directory (its config.yaml names the base; adapter/ is merged)")
    p.add_argument("--out", required=True, help="where to write the merged model directory")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the exported weights (default: the base checkpoint's dtype)")
    p.add_argument("--template", default=None,
                   help="chat template whose stop strings go into generation_config.json (default: auto)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip reloading the export and comparing its logits with the unmerged model's")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")


def run(args) -> int:
    from ..export.merge import export_merged

    result = export_merged(export_out(args), adapter=args.adapter, run=args.run, overrides=args.overrides,
                           dtype=getattr(args, "dtype", None), verify=not args.no_verify, template=args.template)
    report(result)
    return 0


def report(result) -> None:
    print(f"merged {result.method} adapter into {result.base} -> {result.out_dir} ({result.dtype})")
    if result.max_abs_diff is not None:
        print(f"max |logit difference| vs the unmerged model: {result.max_abs_diff:.3g}")
    if result.untied:
        print("note: the adapter changed the tied output head; input and output embeddings are untied in the export")
