"""Accuracy through the deployed decode path: perplexity and multiple choice, teacher-forced in ``generate``.

How a sequence is scored: its prefix (all but its last token) is prefilled, dense, as in serving; then
``generate`` runs one decode step per scored token while a logits processor (a) records the log-probability
the model gave the true next token and (b) forces that token, so the next step sees the true text.
Every scored position therefore comes out of the compiled decode step exactly as deployed (for an
optimized model: the polar backend's rewritten graph), never out of prefill. The first step predicts the
prefix's last token from prefill logits; it is forced but not scored.

Tasks built from the shipped Wikipedia test split (``load_wiki_records("test")``):
- perplexity: ``prefix`` tokens of context, then ``tokens`` scored tokens per text;
- title (4-way): 'This text is from the Wikipedia article titled "<candidate>"' after the lead's start;
- continuation (4-way): the lead's true second sentence vs three second sentences of other articles.
Multiple choice picks the candidate with the highest mean log-likelihood per token (length-normalised,
so short candidates are not favoured).
"""

from __future__ import annotations

import argparse
import math
import random
import re
import time
from dataclasses import dataclass

import torch


class _TeacherForcing:
    """Logits processor: log p(target) per step (skipping step 0), then force the target token."""

    def __init__(self, targets: torch.Tensor, prompt_length: int):
        self.targets = targets  # (B, N), -1 = padding (not scored; forces token 0)
        self.prompt_length = prompt_length
        self.log_probs = torch.zeros(targets.shape, dtype=torch.float64)

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        target = self.targets[:, step].to(scores.device)
        if step > 0:
            log_probs = scores.float().log_softmax(-1).gather(1, target.clamp(min=0)[:, None])[:, 0]
            self.log_probs[:, step] = torch.where(target >= 0, log_probs, 0.0).double().cpu()
        forced = torch.full_like(scores, float("-inf"))
        forced.scatter_(1, target.clamp(min=0)[:, None], 0.0)
        return forced


def score_continuations(model, prefixes: list[list[int]], continuations: list[list[int]], pad_id: int):
    """Summed log-likelihood of each continuation after its prefix, through decode steps; (sum, count) lists.

    Every prefix needs >= 2 tokens: all but its last are prefilled, and a prefill of no token is no prompt (it
    fails, or, batched with longer prefixes, is scored from padding alone). ValueError otherwise.
    """
    from transformers import LogitsProcessorList

    short = [row for row, prefix in enumerate(prefixes) if len(prefix) < 2]
    if short:
        raise ValueError(
            "score_continuations needs prefixes of >= 2 tokens (the last one starts the scored decode steps, the "
            f"rest is prefilled); rows {short[:10]} have {len(prefixes[short[0]])}"
        )

    device = next(model.parameters()).device
    batch = len(prefixes)
    prompt_length = max(len(p) - 1 for p in prefixes)
    steps = max(len(c) for c in continuations) + 1
    ids = torch.full((batch, prompt_length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    targets = torch.full((batch, steps), -1, dtype=torch.long)
    for row, (prefix, continuation) in enumerate(zip(prefixes, continuations, strict=True)):
        body = prefix[:-1]
        ids[row, prompt_length - len(body) :] = torch.tensor(body)
        mask[row, prompt_length - len(body) :] = 1
        targets[row, 0] = prefix[-1]
        targets[row, 1 : 1 + len(continuation)] = torch.tensor(continuation)
    forcing = _TeacherForcing(targets, prompt_length)
    with torch.no_grad():
        model.generate(
            ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=steps,
            do_sample=False,
            cache_implementation="static",
            logits_processor=LogitsProcessorList([forcing]),
            pad_token_id=pad_id,
            # no EOS: nothing may stop a row early, and no min-length processor may touch the logits we score
            eos_token_id=None,
        )
    counts = (targets[:, 1:] >= 0).sum(1)
    return forcing.log_probs[:, 1:].sum(1).tolist(), counts.tolist()


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float
    count: int  # tokens (perplexity) or questions (accuracy)
    # per item, in a fixed order: per text (negative log-likelihood sum, tokens) for perplexity, per question
    # 1/0 for accuracy. Two systems scored on the same items are compared item by item (paired_change).
    items: tuple = ()


def paired_change(system: Estimate, baseline: Estimate) -> tuple[float, float, float]:
    """(change, low, high), 95% CI, of ``system`` against ``baseline`` measured on the same items.

    Perplexity: relative change in percent, from the per-text differences in mean log-likelihood per token
    (Student's t). Accuracy: change in percentage points, Newcombe's interval for a difference of paired
    proportions (``newcombe_paired_interval``), which unlike a t interval on the per-question differences does not
    shrink to a point when every difference is equal (2 questions, or 200 answered alike). Pairing removes the
    spread between items, which dominates either estimate's own interval.
    """
    if len(system.items) != len(baseline.items) or not system.items:
        raise ValueError(f"paired_change needs both estimates on the same items ({len(system.items)} vs "
                         f"{len(baseline.items)})")  # fmt: skip
    if isinstance(system.items[0], tuple):  # perplexity: (nll sum, tokens) per text
        if any(a[1] != b[1] for a, b in zip(system.items, baseline.items, strict=True)):
            raise ValueError("paired_change: the two perplexity estimates scored different token counts")
        diffs = [(a[0] - b[0]) / a[1] for a, b in zip(system.items, baseline.items, strict=True)]
        tokens = sum(c for _, c in system.items)
        mean = (sum(a for a, _ in system.items) - sum(b for b, _ in baseline.items)) / tokens
        half = _half_width(diffs)
        return tuple(100 * (math.exp(x) - 1) for x in (mean, mean - half, mean + half))
    pairs = list(zip(system.items, baseline.items, strict=True))
    table = [sum(1 for pair in pairs if pair == cell) for cell in ((1, 1), (1, 0), (0, 1), (0, 0))]
    if sum(table) != len(pairs):
        raise ValueError("paired_change: accuracy items must be 1 (right) or 0 (wrong)")
    low, high = newcombe_paired_interval(*table)
    return 100 * (table[1] - table[2]) / len(pairs), 100 * low, 100 * high


def newcombe_paired_interval(both: int, only_first: int, only_second: int, neither: int) -> tuple[float, float]:
    """95% interval of p1 - p2, two proportions measured on the same items, from the paired 2x2 table (``both``
    right, ``only_first`` right, ``only_second`` right, ``neither``): Newcombe's method 10 (Newcombe 1998,
    "Improved confidence intervals for the difference between binomial proportions based on paired data").

    The Wilson intervals (l1, u1) and (l2, u2) of p1 and p2 are combined ("square and add") with phi, the
    correlation of the table (Newcombe's corrected estimate: (AD - BC - N/2) / sqrt(product of the margins) when
    AD - BC > N/2, 0 from 0 to N/2, (AD - BC) / sqrt(...) below 0; 0 when a margin is 0):
    low = d - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2), high likewise with (u1 - p1), (p2 - l2).
    """
    n = both + only_first + only_second + neither
    first, second = both + only_first, both + only_second
    p1, p2 = first / n if n else 0.0, second / n if n else 0.0
    l1, u1 = wilson_interval(first, n)  # first: it names an empty table
    l2, u2 = wilson_interval(second, n)
    margins = first * (n - first) * second * (n - second)
    cross = both * neither - only_first * only_second
    corrected = cross - n / 2 if cross > n / 2 else min(cross, 0)  # 0 for 0 <= AD - BC <= N/2
    phi = corrected / math.sqrt(margins) if margins else 0.0
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return p1 - p2 - below, p1 - p2 + above


_Z975 = 1.959963984540054  # the standard normal's 0.975 quantile


def t_quantile_975(df: int) -> float:
    """Student's t 0.975 quantile with ``df`` degrees of freedom (the half-width factor of a two-sided 95% CI).

    Exact for df 1 and 2; from df 3 the Cornish-Fisher expansion in 1/df to the fourth order, within 0.12% of the
    exact value at df 3 and 1e-4 from df 10. df < 1 (a single item): infinite, no interval can be given.
    """
    if df < 1:
        return math.inf
    if df == 1:
        return math.tan(math.pi * 0.475)
    if df == 2:
        return 0.95 / math.sqrt(2 * 0.975 * 0.025)
    z = _Z975
    terms = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    )
    return z + sum(term / df ** (i + 1) for i, term in enumerate(terms))


def _standard_error(values: list[float]) -> float:
    n = len(values)
    mean = sum(values) / n
    return math.sqrt(sum((x - mean) ** 2 for x in values) / max(1, n - 1) / n)


def _half_width(values: list[float]) -> float:
    """Half-width of the 95% CI of the mean of ``values`` (Student's t with n - 1 degrees of freedom; infinite
    for one value, 0 when all are equal)."""
    if len(values) < 2:
        return math.inf
    error = _standard_error(values)
    return 0.0 if error == 0 else t_quantile_975(len(values) - 1) * error


def text_windows(texts, tokenizer, length: int, limit: int) -> list[list[int]]:
    """The first ``length`` token ids of each text that has them, for the first ``limit`` such texts."""
    windows = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= length:
            windows.append(ids[:length])
        if len(windows) == limit:
            break
    return windows


def perplexity(model, tokenizer, texts, *, prefix: int = 32, tokens: int = 96, batch: int = 16, limit: int = 128):
    """Perplexity of ``tokens`` decode-scored tokens after ``prefix`` context tokens, per text (95% CI)."""
    windows = text_windows(texts, tokenizer, prefix + tokens, limit)
    per_text = []  # (nll sum, token count)
    for start in range(0, len(windows), batch):
        chunk = windows[start : start + batch]
        sums, counts = score_continuations(model, [w[:prefix] for w in chunk], [w[prefix:] for w in chunk], 0)
        per_text += [(-s, c) for s, c in zip(sums, counts)]
    total = sum(c for _, c in per_text)
    mean = sum(s for s, _ in per_text) / total
    half = _half_width([s / c for s, c in per_text])
    low, high = math.exp(mean - half), math.exp(mean + half)
    return Estimate(math.exp(mean), low, high, total, tuple(per_text))


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if len(s) > 20]


def build_multiple_choice(records, task: str, *, questions: int | None, seed: int = 0):
    """[(context, [4 candidates], index of the true one)] for task "title" or "continuation"; ``questions``: how
    many (None: one for every record with two sentences; the first n of a larger set are the n-question set)."""
    rng = random.Random(seed)
    pool = [r for r in records if len(_sentences(r.text)) >= 2]
    rng.shuffle(pool)
    built = []
    for record in pool[:questions]:
        others = rng.sample([r for r in pool if r.title != record.title], 3)
        if task == "title":
            context = " ".join(_sentences(record.text)[:1])[:400] + "\nThis text is from the Wikipedia article titled"
            candidates = [f' "{r.title}"' for r in [record, *others]]
        elif task == "continuation":
            context = _sentences(record.text)[0][:400]
            candidates = [" " + _sentences(r.text)[1][:120] for r in [record, *others]]
        else:
            raise ValueError(f"unknown task {task!r}: 'title' or 'continuation'")
        order = list(range(4))
        rng.shuffle(order)
        built.append((context, [candidates[i] for i in order], order.index(0)))
    return built


def multiple_choice_accuracy(model, tokenizer, questions, *, batch_questions: int = 4) -> Estimate:
    correct = []
    for start in range(0, len(questions), batch_questions):
        chunk = questions[start : start + batch_questions]
        prefixes, continuations = [], []
        for context, candidates, _ in chunk:
            context_ids = tokenizer(context)["input_ids"]
            for candidate in candidates:
                prefixes.append(context_ids)
                continuations.append(tokenizer(candidate, add_special_tokens=False)["input_ids"])
        sums, counts = score_continuations(model, prefixes, continuations, 0)
        for q, (_, _, answer) in enumerate(chunk):
            scores = [sums[i] / max(1, counts[i]) for i in range(4 * q, 4 * q + 4)]
            correct.append(int(max(range(4), key=scores.__getitem__) == answer))
    low, high = wilson_interval(sum(correct), len(correct))  # first: it names an empty question list
    return Estimate(sum(correct) / len(correct), low, high, len(correct), tuple(correct))


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: unlike p +- 1.96 sqrt(p(1-p)/n), it stays inside [0, 1] and does
    not shrink to a point when every answer is right (or wrong)."""
    if n < 1:
        raise ValueError("an accuracy needs at least one question")
    p, z2 = successes / n, _Z975**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = _Z975 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class AccuracyRow:
    variant: str
    system: str
    density: float  # the density asked for (--densities); what ran is groups_kept
    groups_kept: str  # "k/G": KV groups (heads for MHA) each sequence attended with, G/G on dense rows
    perplexity: float
    perplexity_ci: str
    tokens: int
    title_accuracy: float
    title_ci: str
    continuation_accuracy: float
    continuation_ci: str
    questions: int
    seconds: float
    # against the same variant's dense row on the same items (paired; empty on dense rows): perplexity in %,
    # accuracies in points, each "change [95% CI]"
    perplexity_change: str = ""
    title_change: str = ""
    continuation_change: str = ""
    # polar rows: the layers kept dense, space-separated ("0" by default); empty on dense rows and on rows written
    # before this column existed (those kept layer 0 dense)
    dense_layers: str = ""


def evaluate_model(model, tokenizer, *, ppl_texts: int, questions: int | None, seed: int = 0) -> dict[str, Estimate]:
    from polar_compile.assets import load_wiki_records

    records = load_wiki_records("test")
    texts = [r.text for r in records]
    estimates = {"perplexity": perplexity(model, tokenizer, texts, limit=ppl_texts)}
    for task in ("title", "continuation"):
        questions_built = build_multiple_choice(records, task, questions=questions, seed=seed)
        estimates[task] = multiple_choice_accuracy(model, tokenizer, questions_built)
    return estimates


def _row(variant, system, density, groups_kept, estimates, seconds, dense=None, dense_layers=()) -> AccuracyRow:
    """One CSV row; ``groups_kept``: "k/G" as run; ``dense``: the same variant's dense estimates, for the paired
    change columns."""
    ppl, title, cont = estimates["perplexity"], estimates["title"], estimates["continuation"]
    changes = ["", "", ""]
    if dense is not None:
        keys = ("perplexity", "title", "continuation")
        changes = [_format_change(*paired_change(estimates[key], dense[key])) for key in keys]
    return AccuracyRow(
        variant, system, density, groups_kept, round(ppl.value, 3), f"[{ppl.low:.2f}, {ppl.high:.2f}]", ppl.count,
        round(title.value, 4), f"[{title.low:.3f}, {title.high:.3f}]", round(cont.value, 4),
        f"[{cont.low:.3f}, {cont.high:.3f}]", title.count, round(seconds, 1), *changes,
        " ".join(str(layer) for layer in dense_layers),
    )  # fmt: skip


def _format_change(change: float, low: float, high: float) -> str:
    return f"{change:+.1f} [{low:+.1f}, {high:+.1f}]"


def parse_questions(text: str) -> int | None:
    """``"200"`` -> 200, ``"all"`` -> None (every question the test split gives: 937 per task)."""
    if text.strip().lower() == "all":
        return None
    return positive_int(text, "a number of questions or 'all'")


def parse_densities(text: str) -> list[float]:
    """``"0.75,0.5"`` -> ``[0.75, 0.5]``: a comma list of attention densities, each in (0, 1]."""
    try:
        densities = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of densities such as 0.75,0.5, got {text!r}") from None
    if not densities:
        raise argparse.ArgumentTypeError("expected at least one density")
    bad = [d for d in densities if not 0 < d <= 1]
    if bad:
        raise argparse.ArgumentTypeError(f"densities must be in (0, 1], got {bad}")
    return densities


def positive_int(text: str, expected: str = "a whole number") -> int:
    """An argparse type: an int >= 1 (``expected`` names what the flag takes, in the error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected {expected} >= 1, got {value}")
    return value


def parse_layers(text: str) -> tuple[int, ...]:
    """``"3,7"`` -> ``(3, 7)``: a comma list of layer indices (the ``--dense-layers`` value)."""
    try:
        layers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of layer indices such as 3,7, got {text!r}") from None
    if any(layer < 0 for layer in layers):
        raise argparse.ArgumentTypeError(f"layer indices must be >= 0, got {text!r}")
    return layers


def sparse_configs(model, routers, densities, dense_layers=None) -> list:
    """One ``SparsityConfig`` per density, checked against ``model``: layer 0 and ``dense_layers`` dense, or with
    ``dense_layers=None`` the router file's calibrated dense layers (layer 0 if it has none; which ones:
    ``config.resolve_dense_layers(routers).dense_layers``).

    Each is passed through ``optimize`` (then ``restore``) here, so a layer index the model lacks raises
    ``optimize``'s ValueError before any evaluation runs rather than after the dense one.
    """
    import polar_compile
    from polar_compile.compiler import restore
    from polar_compile.config import SparsityConfig

    layers = None if dense_layers is None else tuple(sorted({0, *dense_layers}))
    configs = [SparsityConfig(attention_density=density, dense_layers=layers) for density in densities]
    for config in configs:
        polar_compile.optimize(model, routers, config)
        restore(model)
    return configs


MHA_DENSITIES = (0.75, 0.5, 0.3)
# G, the routing groups of each eval variant of SmolLM2-135M (9 query heads sharing 3 KV heads): GQA routes the 3 KV
# groups; the MHA-expanded model gives each of the 9 heads its own KV head, so it routes 9
VARIANT_GROUPS = {"gqa": 3, "mha": 9}


def plan_densities(densities, num_groups: int, flag: str = "--densities") -> list[tuple[float, int]]:
    """``[(density, k)]`` to evaluate: k = ``groups_for_density(density, num_groups)``, the groups that run.

    Densities round to whole groups, so two densities can run the same system: the later one is dropped with a
    printed warning. A density that keeps every group is dense attention, not a sparse row: ValueError naming it.
    """
    from polar_compile.config import groups_for_density, sparse_density_bound

    planned: dict[int, float] = {}
    for density in densities:
        k = groups_for_density(density, num_groups)
        if k == num_groups:
            below = sparse_density_bound(num_groups)
            raise ValueError(f"{flag} {density:g} keeps all {num_groups} of {num_groups} groups (dense attention, "
                             f"not a sparse row): use densities below {below:.4g}")  # fmt: skip
        if k in planned:
            print(f"warning: {flag} {density:g} keeps {k} of {num_groups} groups, as {planned[k]:g} does: the same "
                  f"system, evaluated once (as {planned[k]:g})")  # fmt: skip
            continue
        planned[k] = density
    return [(density, k) for k, density in planned.items()]


def groups_kept_of(variant: str, system: str, density: float) -> str:
    """ "k/G" of a row written before the ``groups_kept`` column, from its variant (``VARIANT_GROUPS``) and density.

    Rows computed before 2026-12-04 rounded k with Python's ``round`` (halves to even) where
    ``groups_for_density`` now rounds halves up: for a density x G that is exactly a half, both are given
    ("4/9 or 5/9"), since the file does not say when the row was computed.
    """
    from polar_compile.config import groups_for_density

    if variant not in VARIANT_GROUPS:
        raise ValueError(f"cannot tell the group count of variant {variant!r} (known: {sorted(VARIANT_GROUPS)})")
    groups = VARIANT_GROUPS[variant]
    if system == "dense":
        return f"{groups}/{groups}"
    k = groups_for_density(density, groups)
    old = max(1, min(groups, round(density * groups)))
    return f"{k}/{groups}" if old == k else f"{min(k, old)}/{groups} or {max(k, old)}/{groups}"


def add_groups_kept(path) -> int:
    """Migrate an accuracy CSV written before the ``groups_kept`` column, in place: every row gets the column
    (``groups_kept_of``). Returns the number of rows migrated (0: nothing to do). ValueError for a file with
    columns AccuracyRow lacks (not an accuracy CSV) or a variant of unknown group count."""
    import csv
    import dataclasses
    from pathlib import Path

    path = Path(path)
    if not path.is_file() or not path.stat().st_size:
        return 0
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        header, rows = list(reader.fieldnames or []), list(reader)
    fields = [f.name for f in dataclasses.fields(AccuracyRow)]
    if "groups_kept" in header or any(name not in fields for name in header):
        return 0  # already migrated, or not an accuracy CSV (bench.check_csv names its columns)
    for line, row in enumerate(rows, start=2):
        try:
            row["groups_kept"] = groups_kept_of(row["variant"], row["system"], float(row["density"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path} line {line}: cannot add its groups_kept column ({error})") from None
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def run_eval(args) -> int:
    """The subcommand. Everything that can be checked is, before any evaluation: arguments, the CSV path and
    header, the offline assets, and every variant's model, routers and configs; each row is appended to the CSV as
    it is produced. An asset that cannot be fetched or read ends it in one line (AssetError's message)."""
    from polar_compile.assets import AssetError

    try:
        return _run_eval(args)
    except AssetError as error:
        raise SystemExit(f"polar-compile eval: {error}") from None


def _run_eval(args) -> int:
    from pathlib import Path

    import polar_compile
    from polar_compile.assets import load_smollm2, load_wiki_records
    from polar_compile.bench import append_csv, check_csv
    from polar_compile.compiler import restore

    if args.mha_densities is not None and not args.mha_routers:
        raise SystemExit("polar-compile eval: --mha-densities needs --mha-routers (the MHA variant's router file)")
    for flag, path in (("--routers", args.routers), ("--mha-routers", args.mha_routers)):
        if path and not Path(path).is_file():
            raise SystemExit(f"polar-compile eval: {flag}: no file at {path}")
    csv_path = Path(args.csv) if args.csv else None
    try:
        if csv_path is not None:
            check_csv(csv_path, AccuracyRow)
            migrated = add_groups_kept(csv_path)
            if migrated:
                print(f"note: {args.csv} predates the groups_kept column: added it to its {migrated} rows")
    except (ValueError, OSError) as error:
        raise SystemExit(f"polar-compile eval: {error}") from None
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    variants = [("gqa", args.routers, args.densities)]
    if args.mha_routers:
        variants.append(("mha", args.mha_routers, args.mha_densities or MHA_DENSITIES))
    prepared = []  # every variant set up and checked before the first evaluation
    for variant, router_path, densities in variants:
        model, tokenizer = load_smollm2(dtype=dtype, device=device)
        flag, routers_flag = ("--densities", "--routers") if variant == "gqa" else ("--mha-densities", "--mha-routers")
        try:  # another model's router file, a layer index the model lacks, a density that keeps every group: one
            # line, before any evaluation
            if variant == "mha":
                from polar_compile.mha import expand_kv_heads

                expand_kv_heads(model)
            try:
                routers = polar_compile.load_routers(router_path or _default_routers(), model)
            except ValueError as error:
                raise ValueError(f"{routers_flag}: {error}") from None
            planned = plan_densities(densities, routers.num_groups, flag)
            configs = sparse_configs(model, routers, [density for density, _ in planned], args.dense_layers)
        except ValueError as error:
            raise SystemExit(f"polar-compile eval: {error}") from None
        prepared.append((variant, model, tokenizer, routers, planned, configs))
    load_wiki_records("test")  # the texts and questions: fetched (or refused) now, not within the first evaluation

    rows = []

    def emit(row: AccuracyRow) -> None:
        rows.append(row)
        print(row)
        if csv_path is not None:  # now: a later failure must not lose the rows already computed
            append_csv(csv_path, [row])

    while prepared:
        variant, model, tokenizer, routers, planned, configs = prepared.pop(0)
        groups = routers.num_groups
        start = time.perf_counter()
        dense = evaluate_model(model, tokenizer, ppl_texts=args.texts, questions=args.questions)
        emit(_row(variant, "dense", 1.0, f"{groups}/{groups}", dense, time.perf_counter() - start))
        if len(rows) == 1:  # the test split caps both counts: say so once, rather than report fewer silently
            _note_capped(args, len(dense["perplexity"].items), min(dense["title"].count, dense["continuation"].count))
        for config, (_, k) in zip(configs, planned, strict=True):
            torch._dynamo.reset()  # each config compiles afresh: graphs of earlier ones must not use up the limit
            polar_compile.optimize(model, routers, config)
            start = time.perf_counter()
            estimates = evaluate_model(model, tokenizer, ppl_texts=args.texts, questions=args.questions)
            seconds = time.perf_counter() - start
            density = config.attention_density
            dense_layers = config.resolve_dense_layers(routers).dense_layers
            emit(_row(variant, "polar", density, f"{k}/{groups}", estimates, seconds, dense, dense_layers))
            for line in polar_compile.explain(model).eager_steps:
                print(f"warning: {line}")
            restore(model)
        del model  # the next variant's model is already loaded
    print(f"\n{'variant':<8}{'system':<7}{'density':>8}{'groups':>8}{'ppl':>9}  {'95% CI':<16}{'title':>7}"
          f"{'cont.':>7}{'n':>5}  {'ppl vs dense %':<22}{'title vs dense, points':<24}{'cont. vs dense, points':<24}"
          "dense layers")  # fmt: skip
    for r in rows:
        print(
            f"{r.variant:<8}{r.system:<7}{r.density:>8.3f}{r.groups_kept:>8}{r.perplexity:>9.2f}  {r.perplexity_ci:<16}"
            f"{100 * r.title_accuracy:>6.1f}%{100 * r.continuation_accuracy:>6.1f}%{r.questions:>5}"
            f"  {r.perplexity_change:<22}{r.title_change:<24}{r.continuation_change:<24}{r.dense_layers}"
        )
    print(f"perplexity over {rows[0].tokens} decode-scored tokens per row; accuracy over {rows[0].questions} questions;"
          " changes are paired against the variant's dense row on the same items (95% CI)")  # fmt: skip
    return 0


def _note_capped(args, texts: int, questions: int) -> None:
    if texts < args.texts:
        print(f"note: --texts {args.texts} asked for more texts than the test split has of {32 + 96} tokens or more: "
              f"perplexity is over its {texts}")  # fmt: skip
    if args.questions is not None and questions < args.questions:
        print(f"note: --questions {args.questions} asked for more than the test split gives: accuracy is over its "
              f"{questions} questions per task")  # fmt: skip


def _default_routers():
    from polar_compile.demo import shipped_routers_path

    return shipped_routers_path()


def add_eval_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--routers", help="router file for SmolLM2 (default: the shipped one)")
    parser.add_argument("--densities", type=parse_densities, default=[0.6667],
                        help="comma list of densities to evaluate (GQA, 3 KV groups: a density keeps round(density x "
                        "3) of them, 1 or 2 in a sparse row; default 0.6667: 2 of 3)")  # fmt: skip
    parser.add_argument("--mha-routers", help="router file for the MHA-expanded SmolLM2 (enables that variant)")
    parser.add_argument("--mha-densities", type=parse_densities, default=None,
                        help=f"densities of the MHA variant, 9 heads (default {','.join(map(str, MHA_DENSITIES))}: "
                        "7, 5 and 3 heads)")  # fmt: skip
    parser.add_argument(
        "--dense-layers",
        type=parse_layers,
        default=None,
        help="comma list of layers kept dense besides layer 0, e.g. 3,7 (all sparse rows, both variants; default: "
        "the router file's calibrated dense layers; 0 for layer 0 alone)",
    )
    parser.add_argument(
        "--texts",
        type=positive_int,
        default=128,
        help="texts for perplexity (32 tokens of context, then 96 scored; the test split has 271 that long, so a "
        "larger number gives 271; default %(default)s)",
    )
    parser.add_argument(
        "--questions",
        type=parse_questions,
        default=200,
        help="questions per multiple-choice task, or 'all' (937 each, the most the test split gives: a larger "
        "number gives 937; a paired CI of about +-1.6 points where 200 give +-4; 24-31 min a system on 2 CPU cores)",
    )
    parser.add_argument("--csv", default="benchmarks/results/accuracy.csv",
                        help="CSV the rows are appended to (default: %(default)s, under the current folder; '' for "
                        "none)")  # fmt: skip
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is available (fp32)")
    parser.set_defaults(func=run_eval)
