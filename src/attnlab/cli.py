"""``attnlab``: explain a model trained elsewhere, from the command line.

``attnlab explain`` builds the model from a factory you name, loads its weights
safely, records its attention and writes explanations, faithfulness, head diagnostics
and an HTML report into a directory; ``attnlab report DIR`` renders that report again.
Errors print one line naming the problem and exit with status 2, leaving DIR untouched.
"""
from __future__ import annotations

import argparse
import os
import sys

EXAMPLE = """example:
  attnlab explain --model my_model.py:make_model --weights model.pt \\
      --inputs clips.npy --labels labels.npy --out explained/
  (my_model.py defines make_model() returning the nn.Module; model.pt holds its state
  dict; clips.npy is [N, T, ...] with the items along dim 1)"""


def _readout(value: str) -> str | int:
    if value in ("cls", "mean"):
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected cls, mean or a token index") from None


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="attnlab", description="Explain the attention of a model trained elsewhere.",
                                  epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True, metavar="{explain,report}")
    ex = sub.add_parser("explain", help="record, explain, evaluate and report a model trained elsewhere",
                        description="Record every attention map of your model on your inputs, compute every "
                        "explanation method, their faithfulness (deletion/insertion beside a random baseline), "
                        "the head diagnostics and, for token ids with --vocab, the vocabulary x vocabulary "
                        "attention; write them and report.html into --out.",
                        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("--model", required=True, metavar="FILE_OR_MODULE:FACTORY",
                    help="a Python file (path/to/model.py:make_model) or an importable module "
                    "(package.module:make_model) and a callable returning the nn.Module")
    ex.add_argument("--weights", metavar="CKPT", help="its state dict: torch.save (loaded with weights_only=True) "
                    "or .safetensors; a factory named inside the file is never used")
    ex.add_argument("--inputs", action="append", default=[], metavar="X.npy",
                    help="inputs, batch-first, items along dim 1 ([N, T, C], [N, T, C, H, W], token ids [N, L]); "
                    "repeat for a model with several inputs (model(x1, x2, ...))")
    ex.add_argument("--labels", metavar="Y.npy", help="integer class ids [N]: accuracy in metrics.json")
    ex.add_argument("--tokens", metavar="T.txt", help="instead of --inputs: one sequence per line of "
                    "whitespace-separated tokens, encoded with --vocab (needs <pad> and <unk>)")
    ex.add_argument("--vocab", metavar="V.txt", help="one token per line (line i = token id i): adds the "
                    "vocabulary x vocabulary attention of every layer")
    ex.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced on success only)")
    ex.add_argument("--methods", nargs="+", metavar="METHOD", help="explanation methods (default: every "
                    "default method of the registry that fits the inputs)")
    ex.add_argument("--readout", type=_readout, default="mean", metavar="cls|mean|INDEX",
                    help="which output is explained: the class token, the mean over tokens (default), a token")
    ex.add_argument("--batch-size", type=int, default=32, metavar="N", help="samples per batch (default 32)")
    rp = sub.add_parser("report", help="render the report of an 'attnlab explain' directory again",
                        description="Render DIR/report.html again from the files 'attnlab explain' wrote.",
                        epilog="example:\n  attnlab report explained/", formatter_class=argparse.RawDescriptionHelpFormatter)
    rp.add_argument("dir", metavar="DIR")
    return top


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = parser().parse_args(argv)
    from attnlab.io import ExternalError

    try:
        if args.command == "report":
            return _report(args.dir)
        return _explain(args)
    except ExternalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _explain(args: argparse.Namespace) -> int:
    import attnlab.external as external

    model = external.build(args.model)
    if args.weights:
        external.load_weights(model, args.weights)
    data = external.load_inputs(args.inputs, labels=args.labels, tokens=args.tokens, vocab=args.vocab)
    out = external.explain_model(model, data, args.out, methods=args.methods, readout=args.readout,
                                 batch_size=args.batch_size, progress=sys.stderr.isatty(),
                                 source={"model": args.model, "weights": args.weights})
    print(f"wrote {out}/report.html")
    return 0


def _report(directory: str) -> int:
    from attnlab.external import write_directory_report

    print(f"wrote {write_directory_report(directory)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
