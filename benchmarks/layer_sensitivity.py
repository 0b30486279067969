"""Which SmolLM2-135M layers cost the perplexity at 2 of 3 KV groups, and how many must stay dense for +4%?

Perplexity on a reduced text set (``--texts`` Wikipedia test texts x 96 decode-scored tokens after 32 of
context; ``polar_compile.evaluate.perplexity``), through the compiled decode path with the shipped routers, one
model load for every run. The texts are the ones after the first ``--skip`` (48) that ``polar-compile eval``
scores, so a layer set chosen here is confirmed by ``polar-compile eval --texts 48`` on texts it was not chosen on.

- ``dense`` (no optimize) and ``all`` (layers 1..29 at 2 of 3 groups, layer 0 dense: the default);
- ``single:i`` for i in 1..29: only layer i sparse, every other layer dense (the sensitivity of layer i);
- ``greedy:n`` for the requested n: the n most sensitive layers (by ``single:i``, or the first n of
  ``--order``) kept dense as well as layer 0, the rest sparse; run from the smallest n up, stopping at the
  first n under ``--target`` percent (unless ``--no-stop``).

Each run's change is paired per text against ``dense`` (``paired_change``, 95% CI). Runs are appended to
``--out`` (JSON, per-text estimates) as they finish, and a run already there is not repeated, so the sweep
can be resumed or extended; ``--report`` prints the tables from the file.

PYTHONPATH=. python benchmarks/layer_sensitivity.py --texts 32 --out benchmarks/results/layer_sensitivity.json \
    --greedy 2,4,6,8,10,12,14,16,18,20,22,24,26,28
PYTHONPATH=. python benchmarks/layer_sensitivity.py --report --out benchmarks/results/layer_sensitivity.json
# the same ranking's curve on the 48 texts eval scores (order: the single:i ranking printed above)
PYTHONPATH=. python benchmarks/layer_sensitivity.py --texts 48 --skip 0 --singles '' --order 22,27,15,16,21,12,... \
    --greedy 2,4,6,8,9,10,11,12,14 --no-stop --out benchmarks/results/layer_sensitivity_eval48.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from polar_compile.evaluate import Estimate, paired_change

DENSITY = 0.6667  # 2 of 3 KV groups


def _kv_share(dense_layers: tuple[int, ...], layers: int, groups: int, kept: int) -> float:
    """KV bytes read per decode step, as a share of dense: (dense * groups + sparse * kept) / (layers * groups)."""
    dense = len(set(dense_layers))
    return (dense * groups + (layers - dense) * kept) / (layers * groups)


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def _estimate(entry: dict) -> Estimate:
    return Estimate(entry["ppl"], 0.0, 0.0, entry["tokens"], tuple(tuple(item) for item in entry["items"]))


def _change(results: dict, name: str) -> tuple[float, float, float]:
    return paired_change(_estimate(results["runs"][name]), _estimate(results["runs"]["dense"]))


def _sensitivity_order(results: dict, layers: int) -> list[int]:
    """Layers 1..layers-1, most sensitive first (largest single-layer perplexity change)."""
    return sorted(range(1, layers), key=lambda i: -_change(results, f"single:{i}")[0])


def report(results: dict) -> None:
    runs, meta = results["runs"], results["meta"]
    layers = meta["layers"]
    print(f"{meta['texts']} texts x 96 tokens = {runs['dense']['tokens']} tokens (after the first {meta['skip']} "
          f"eval texts); dense ppl {runs['dense']['ppl']:.3f}")  # fmt: skip
    singles = [i for i in range(1, layers) if f"single:{i}" in runs]
    if singles:
        print("\nonly layer i sparse (2 of 3 groups), all others dense; ppl change vs dense, % [95% CI]")
        total = 0.0
        for i in sorted(singles, key=lambda i: -_change(results, f"single:{i}")[0]):
            change, low, high = _change(results, f"single:{i}")
            total += change
            print(f"  layer {i:>2}: {change:+6.2f} [{low:+.2f}, {high:+.2f}]  ({runs[f'single:{i}']['seconds']:.0f} s)")
        print(f"  sum of the single-layer changes: {total:+.1f}%")
        # changes compound multiplicatively in perplexity: the sum of log-ratios predicts the all-sparse change
        logs = sum(
            (runs[f"single:{i}"]["nll"] - runs["dense"]["nll"]) / runs["dense"]["tokens"] for i in singles
        )  # fmt: skip
        print(f"  product of the single-layer ratios: {100 * (pow(2.718281828459045, logs) - 1):+.1f}%")
    print("\nlayers kept dense -> ppl change vs dense, % [95% CI], KV share read per decode step")
    named = [("all", ())] + [(n, tuple(runs[n]["dense_layers"])) for n in runs if n.startswith("greedy:")]
    for name, _ in sorted(named, key=lambda item: len(runs[item[0]]["dense_layers"])):
        if name not in runs:
            continue
        change, low, high = _change(results, name)
        dense = runs[name]["dense_layers"]
        share = _kv_share(tuple(dense), layers, meta["groups"], meta["kept"])
        listed = ",".join(map(str, dense))
        print(f"  {name:<10} {len(dense):>2} dense  {change:+6.2f} [{low:+.2f}, {high:+.2f}]  KV {share:.3f}  {listed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=32)
    parser.add_argument("--skip", type=int, default=48, help="skip the texts `polar-compile eval --texts SKIP` scores")
    parser.add_argument("--out", default="benchmarks/results/layer_sensitivity.json")
    parser.add_argument("--singles", default="all", help="layers for single:i runs: 'all' (1..L-1), or a comma list")
    parser.add_argument("--greedy", default="", help="comma list of n (layers kept dense besides 0) to try")
    parser.add_argument("--order", default="", help="greedy order (comma list) instead of the single:i ranking")
    parser.add_argument("--target", type=float, default=4.0, help="greedy stops at the first n under this change, %%")
    parser.add_argument("--no-stop", action="store_true", help="run every --greedy n")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    if args.report:
        report(_load(out))
        return

    import polar_compile
    from polar_compile.assets import load_smollm2, load_wiki_records
    from polar_compile.compiler import restore
    from polar_compile.demo import shipped_routers_path
    from polar_compile.evaluate import perplexity, sparse_configs
    from polar_compile.model_info import describe_model

    torch.manual_seed(0)
    model, tokenizer = load_smollm2(dtype=torch.float32, device="cpu")
    routers = polar_compile.load_routers(shipped_routers_path(), model)
    info = describe_model(model)
    layers = info.num_layers
    texts = [record.text for record in load_wiki_records("test")]
    scored = [i for i, text in enumerate(texts) if len(tokenizer(text)["input_ids"]) >= 32 + 96]  # as perplexity()
    texts = texts[scored[args.skip - 1] + 1 :] if args.skip else texts
    results = _load(out)
    kept = round(DENSITY * info.num_groups)
    meta = {"texts": args.texts, "skip": args.skip, "density": DENSITY, "layers": layers}
    meta |= {"groups": info.num_groups, "kept": kept}
    if results.get("meta", meta) != meta:
        raise SystemExit(f"{out} holds runs of another setting ({results['meta']}): use another --out")
    results["meta"] = meta

    def run(name: str, dense_layers: tuple[int, ...] | None) -> None:
        if name in results["runs"]:
            return
        start = time.perf_counter()
        if dense_layers is not None:
            torch._dynamo.reset()  # a fresh graph per config: earlier configs' graphs must not use up the limit
            (config,) = sparse_configs(model, routers, [DENSITY], dense_layers)
            polar_compile.optimize(model, routers, config)
        estimate = perplexity(model, tokenizer, texts, limit=args.texts)
        if dense_layers is not None:
            eager = polar_compile.explain(model).eager_steps
            if eager:
                raise RuntimeError(f"{name}: decode steps ran eager and dense: {eager}")
            restore(model)
        seconds = time.perf_counter() - start
        results["runs"][name] = {
            "ppl": estimate.value,
            "tokens": estimate.count,
            "nll": sum(s for s, _ in estimate.items),
            "items": [list(item) for item in estimate.items],
            "dense_layers": sorted({0, *dense_layers}) if dense_layers is not None else None,
            "seconds": round(seconds, 1),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        line = f"{name:<10} ppl {estimate.value:8.3f}  {seconds:6.1f} s"
        if name != "dense":
            line += "  change {:+.2f}% [{:+.2f}, {:+.2f}]".format(*_change(results, name))
        print(line, flush=True)

    run("dense", None)
    run("all", ())
    singles = range(1, layers) if args.singles == "all" else [int(i) for i in args.singles.split(",") if i]
    for i in singles:
        run(f"single:{i}", tuple(j for j in range(1, layers) if j != i))
    if args.greedy:
        order = [int(i) for i in args.order.split(",")] if args.order else _sensitivity_order(results, layers)
        print("sensitivity order:", order, flush=True)
        for n in sorted(int(n) for n in args.greedy.split(",")):
            name = f"greedy:{n}"
            run(name, tuple(order[:n]))
            if not args.no_stop and _change(results, name)[0] < args.target:
                break
    report(results)


if __name__ == "__main__":
    main()
