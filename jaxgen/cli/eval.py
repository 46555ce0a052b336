"""`jaxgen eval perplexity|bleu|rouge`: a run's perplexity; BLEU/ROUGE of `generate` output."""

from __future__ import annotations

import argparse
import pathlib


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a run; BLEU/ROUGE of generations")
    eval_sub = p.add_subparsers(dest="eval_command", required=True, metavar="METRIC")
    q = eval_sub.add_parser("perplexity", help="nats/token, perplexity, nats/char, bits/byte")
    q.add_argument("--run", required=True, help="run directory (or Hugging Face model directory)")
    q.add_argument("--checkpoint", type=int, help="checkpoint step (default: the latest)")
    q.add_argument(
        "--weights",
        choices=("float32", "bfloat16", "int8", "int8-head"),
        help="score with weights stored as (quality cost)",
    )
    source = q.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="a UTF-8 text file")
    source.add_argument("--split", help="a prepared split of the run's dataset, e.g. validation")
    q.add_argument("--json", help="where to write the result (default: RUN/eval/perplexity-<source>.json)")
    q.set_defaults(handler=_cmd_perplexity)
    for metric in ("bleu", "rouge"):
        q = eval_sub.add_parser(metric, help=f"{metric.upper()} of generate output against references")
        q.add_argument("--predictions", required=True, help="jaxgen generate output JSONL")
        q.add_argument("--references", required=True, help='JSONL of {"id", "reference" or "references"}')
        q.add_argument("--json", help=f"where to write the result (default: PREDICTIONS.{metric}.json)")
        q.set_defaults(handler=_cmd_text_metric, metric=metric)


def _cmd_perplexity(args: argparse.Namespace) -> int:
    from jaxgen.evaluate import perplexity as evaluate
    from jaxgen.inference.language_model import load

    lm = load(args.run, step=args.checkpoint, weights=args.weights)
    if args.text:
        result = evaluate.perplexity_of_text(lm, args.text)
        source = pathlib.Path(args.text).stem
    else:
        result = evaluate.perplexity_of_split(lm, args.split)
        source = args.split
    out = args.json or pathlib.Path(args.run) / "eval" / f"perplexity-{source}.json"
    evaluate.write_json(out, result)
    evaluate.print_table(f"perplexity of {args.run} on {source}", result)
    return 0


def _cmd_text_metric(args: argparse.Namespace) -> int:
    from jaxgen.evaluate import perplexity as evaluate

    hyps, refs = evaluate.paired(args.predictions, args.references)
    result = getattr(evaluate, args.metric)(hyps, refs)
    evaluate.write_json(args.json or f"{args.predictions}.{args.metric}.json", result)
    evaluate.print_table(f"{args.metric.upper()} of {args.predictions}", result)
    return 0
