"""Router error vs the method itself: SmolLM2 accuracy with trained routers and with oracle head choices.

Every system is scored exactly as ``polar-compile eval`` scores one (``polar_compile.evaluate.evaluate_model``:
teacher-forced decode through ``generate`` with a static cache, prefill dense), but eagerly on CPU, with the
sparsity applied by forward pre-hooks on each layer's ``o_proj`` that act only on decode steps (one query
token) and leave layer 0 dense:

- ``dense``: no hooks.
- ``router:K[:FILE]``: trained GQA routers keep K of 3 KV groups, through ``polar_compile.reference.
  masked_reference`` (the eager statement of the compiled path). FILE defaults to the shipped router file.
- ``pre:gqa:K`` / ``pre:mha:K``: oracle. Per sequence, keep the K groups whose attention output (the o_proj
  input) has the largest L2 norm; a group's score is the max over its query heads' norms (the calibration
  label of ``polar_compile.routers.collect``). gqa: a group is a KV head with its 3 query heads (3 groups);
  mha: a group is one query head (9 groups; no KV expansion is needed to simulate this).
- ``post:gqa:K`` / ``post:mha:K``: oracle scored after the output projection: the group's score is
  ``|| o_proj.weight[:, cols] @ attn[cols] ||`` over the group's columns.

Each finished system's per-item estimates go to ``--out`` (JSON, one entry per system, appended as systems
finish), so runs can be split across invocations; ``--report`` prints the table with paired changes against
the ``dense`` entry (95% CI) from that file; a system scored on fewer questions than dense is paired with
dense's first questions (the same questions: see ``_first``).

PYTHONPATH=. python benchmarks/oracle_accuracy.py --systems dense,pre:gqa:2,post:gqa:2,router:2 \
    --texts 48 --questions 150 --out benchmarks/results/oracle_accuracy.json
PYTHONPATH=. python benchmarks/oracle_accuracy.py --report --out benchmarks/results/oracle_accuracy.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from polar_compile.evaluate import Estimate, evaluate_model, paired_change

TASKS = ("perplexity", "title", "continuation")


def _group_scores(attention: torch.Tensor, o_weight: torch.Tensor, groups: int, head_dim: int, label: str):
    """(B, Hq * D) attention output of one decode step -> (B, groups) scores."""
    batch, width = attention.shape
    per_group = attention.float().view(batch, groups, width // groups)  # a group's columns are contiguous
    if label == "pre":
        heads = per_group.reshape(batch, groups, -1, head_dim).norm(dim=-1)  # (B, groups, heads per group)
        return heads.amax(-1)
    weight = o_weight.float().view(o_weight.shape[0], groups, width // groups)  # (d, groups, cols)
    contribution = torch.einsum("bgc,dgc->bgd", per_group, weight)  # each group's share of o_proj's output
    return contribution.norm(dim=-1)


@contextlib.contextmanager
def oracle(model, label: str, variant: str, k: int):
    """Within this block, decode steps keep per sequence the k best groups by the oracle score (layer 0 dense)."""
    from polar_compile.model_info import describe_model

    info = describe_model(model)
    groups = info.num_groups if variant == "gqa" else info.num_heads
    if not 1 <= k <= groups:
        raise ValueError(f"k={k} must be in 1..{groups}")
    width = info.num_heads * info.head_dim // groups

    def make_hook(o_proj):
        def mask_groups(module, args):
            attention = args[0]  # (B, T, Hq * D)
            if attention.shape[1] != 1:
                return None  # prefill (and any multi-token call) stays dense
            scores = _group_scores(attention[:, 0], o_proj.weight, groups, info.head_dim, label)
            chosen = scores.topk(k, dim=-1).indices
            keep = torch.zeros_like(scores).scatter_(-1, chosen, 1.0)
            keep = keep.repeat_interleave(width, dim=-1).to(attention.dtype)[:, None, :]
            return (attention * keep, *args[1:])

        return mask_groups

    handles = [layer.o_proj.register_forward_pre_hook(make_hook(layer.o_proj)) for layer in info.layers[1:]]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def router(model, k: int, path: str | None):
    """The trained GQA routers at k groups, through the eager masked reference of the compiled path."""
    import polar_compile
    from polar_compile.compiler import restore
    from polar_compile.config import SparsityConfig
    from polar_compile.demo import shipped_routers_path
    from polar_compile.reference import masked_reference

    routers = polar_compile.load_routers(path or shipped_routers_path(), model)
    polar_compile.optimize(model, routers, SparsityConfig(attention_density=k / routers.num_groups))
    plan_k = set(model._polar_plan.sparse_layers.values())
    if plan_k != {k}:
        raise RuntimeError(f"optimize planned k={plan_k}, wanted {k}")
    model.generation_config.disable_compile = True  # eager: the masked reference, not the compiled graph
    try:
        with masked_reference(model):
            yield model
    finally:
        model.generation_config.disable_compile = False
        restore(model)


def system_context(model, name: str):
    parts = name.split(":")
    if parts[0] == "dense":
        return contextlib.nullcontext(model)
    if parts[0] == "router":
        return router(model, int(parts[1]), parts[2] if len(parts) > 2 else None)
    if parts[0] in ("pre", "post"):
        return oracle(model, parts[0], parts[1], int(parts[2]))
    raise ValueError(f"unknown system {name!r}")


def _save(path: Path, name: str, estimates: dict[str, Estimate], seconds: float, settings: dict) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = {
        "seconds": round(seconds, 1),
        **settings,
        **{task: {"value": e.value, "low": e.low, "high": e.high, "count": e.count, "items": list(e.items)}
           for task, e in estimates.items()},
    }  # fmt: skip
    path.write_text(json.dumps(data))


def _load(path: Path) -> dict[str, dict]:
    out = {}
    for name, entry in json.loads(path.read_text()).items():
        estimates = {}
        for task in TASKS:
            e = entry[task]
            items = tuple(tuple(i) if isinstance(i, list) else i for i in e["items"])
            estimates[task] = Estimate(e["value"], e["low"], e["high"], e["count"], items)
        out[name] = {"estimates": estimates, **{k: v for k, v in entry.items() if k not in TASKS}}
    return out


def _first(baseline: Estimate, system: Estimate) -> Estimate:
    """``baseline`` on the items ``system`` was scored on. build_multiple_choice draws questions in order from
    one seeded RNG, so questions=60 are the first 60 of questions=150 (and batches of 4 split them alike)."""
    n = len(system.items)
    if n >= len(baseline.items) or isinstance(baseline.items[0], tuple):
        return baseline
    return Estimate(sum(baseline.items[:n]) / n, 0.0, 0.0, n, baseline.items[:n])


def report(path: Path) -> None:
    data = _load(path)
    dense = data.get("dense")
    print(f"{'system':<28}{'ppl':>7}  {'ppl vs dense % [95% CI]':<25}{'title':>7}  {'vs dense, pts':<22}"
          f"{'cont.':>7}  {'vs dense, pts':<22}{'n':>5}{'s':>7}")  # fmt: skip
    for name, entry in data.items():
        e = entry["estimates"]
        changes = ["", "", ""]
        if dense is not None and name != "dense":
            changes = ["{:+.1f} [{:+.1f}, {:+.1f}]".format(*paired_change(e[t], _first(dense["estimates"][t], e[t])))
                       for t in TASKS]  # fmt: skip
        print(f"{name:<28}{e['perplexity'].value:>7.2f}  {changes[0]:<25}{100 * e['title'].value:>6.1f}%  "
              f"{changes[1]:<22}{100 * e['continuation'].value:>6.1f}%  {changes[2]:<22}{e['title'].count:>5}"
              f"{entry['seconds']:>7.0f}")  # fmt: skip
    if dense is not None:
        for n in sorted({entry["estimates"]["title"].count for entry in data.values()} - {dense["questions"]}):
            title, cont = (_first(dense["estimates"][t], Estimate(0, 0, 0, n, (0,) * n)) for t in TASKS[1:])
            print(f"dense on the first {n} questions: title {100 * title.value:.1f}%, "
                  f"continuation {100 * cont.value:.1f}%")  # fmt: skip
        print(f"perplexity over {dense['estimates']['perplexity'].count} decode-scored tokens "
              f"({dense['texts']} texts); changes paired against dense on the same items")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default="", help="comma-separated: dense, router:K[:FILE], pre|post:gqa|mha:K")
    parser.add_argument("--texts", type=int, default=48)
    parser.add_argument("--questions", type=int, default=150)
    parser.add_argument("--out", default="benchmarks/results/oracle_accuracy.json")
    parser.add_argument("--report", action="store_true", help="only print the table from --out")
    args = parser.parse_args()
    out = Path(args.out)
    if args.report:
        report(out)
        return 0
    from polar_compile.assets import load_smollm2

    model, tokenizer = load_smollm2(dtype=torch.float32, device="cpu")
    settings = {"texts": args.texts, "questions": args.questions}
    for name in [s for s in args.systems.split(",") if s]:
        start = time.perf_counter()
        with system_context(model, name):
            estimates = evaluate_model(model, tokenizer, ppl_texts=args.texts, questions=args.questions)
        seconds = time.perf_counter() - start
        _save(out, name, estimates, seconds, settings)
        e = estimates
        print(f"{name}: ppl {e['perplexity'].value:.3f} title {e['title'].value:.4f} "
              f"cont {e['continuation'].value:.4f} ({seconds:.0f} s)", flush=True)  # fmt: skip
    if out.exists():
        report(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
