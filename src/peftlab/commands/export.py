"""peftlab export --format gguf (--run RUN | --adapter DIR) --out DIR [--type f16|bf16|q8_0] [--adapter-only]"""

from __future__ import annotations

from ._args import export_out

NAME = "export"
HELP = "export a run for local runtimes: GGUF for llama.cpp and Ollama (merged model or LoRA alone), or HF"


def add_arguments(p) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. model.name=DIR for an adapter that does not record its base")
    p.add_argument("--format", choices=["gguf", "hf"], default="gguf",
                   help="gguf: one llama.cpp/Ollama file (+ Modelfile); hf: a merged Hugging Face directory "
                        "(as `peftlab merge`)")
    p.add_argument("--run", help="a run directory (its config.yaml names the base)")
    p.add_argument("--adapter", help="an adapter directory (peftlab or Hugging Face PEFT)")
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--type", dest="kind", choices=["f16", "bf16", "q8_0"], default="f16",
                   help="GGUF storage of the weight matrices (norms and biases stay f32); default f16")
    p.add_argument("--adapter-only", action="store_true",
                   help="write the LoRA factors alone as a llama.cpp LoRA GGUF (llama-cli --lora FILE)")
    p.add_argument("--gguf-pre", default=None,
                   help="llama.cpp's pre-tokenizer name, for a tokenizer the exporter does not recognise")
    p.add_argument("--template", default=None, help="chat template for the stop strings (default: auto)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip reading the file back with transformers and comparing logits and tokens")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")


def run(args) -> int:
    from ..errors import ConfigError

    if args.format == "hf":
        if args.adapter_only:
            raise ConfigError("--adapter-only goes with --format gguf; a Hugging Face adapter is the run's adapter/ "
                              "directory already")
        from . import merge

        return merge.run(args)  # `peftlab merge`, at the base checkpoint's dtype
    out = export_out(args)
    from ..export.gguf_export import export_gguf

    res = export_gguf(out, run=args.run, adapter=args.adapter, overrides=args.overrides, kind=args.kind,
                      adapter_only=args.adapter_only, verify=not args.no_verify, pre=args.gguf_pre,
                      template=args.template)
    print(f"wrote {res.file} ({res.arch}, {res.kind})")
    if args.adapter_only:
        print(f"use it with llama.cpp: llama-cli -m BASE.gguf --lora {res.file}")
    else:
        if res.max_abs_diff_rounded is not None:
            print(f"read back by transformers: max |logit difference| {res.max_abs_diff_rounded:.3g} vs the merged "
                  f"model rounded to {res.kind}, {res.max_abs_diff_fp32:.3g} vs float32")
        print(f"Ollama: cd {res.out_dir} && ollama create NAME -f Modelfile; llama.cpp: llama-cli -m {res.file}")
    return 0
