"""The decode benchmark's plumbing and byte floor, on the CPU with a tiny shape (speed numbers need a GPU)."""

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polar_compile import bench


@pytest.fixture
def tiny_shape(monkeypatch):
    fields = dict(hidden_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=512, vocab_size=256, max_position_embeddings=512)  # fmt: skip
    monkeypatch.setitem(bench.MODEL_SHAPES, "tiny-llama", ("LlamaConfig", fields))
    monkeypatch.setitem(bench.PAPER_DENSITY, "tiny-llama", 0.5)
    return "tiny-llama"


def test_byte_floor_matches_hand_count():
    # Llama-3-8B, B=64, S=4096: KV = 32 layers x 2 x 64 x 8 x 4096 x 128 x 2 B = 34.4 GB; weights ~15 GB.
    dense = bench.step_floor_ms_cached("llama3-8b", 64, 4096, None, 3e12)
    half = bench.step_floor_ms_cached("llama3-8b", 64, 4096, 0.5, 3e12)
    kv_ms = 1e3 * 32 * 2 * 64 * 8 * 4096 * 128 * 2 / 3e12
    router_ms = 1e3 * 31 * 8 * (4096 + 1) * 2 / 3e12  # the attention routers (d -> 8 groups) of layers 1..31
    assert math.isclose(dense - half, kv_ms * 31 / 32 / 2 - router_ms, rel_tol=1e-9)
    assert bench.step_floor_ms_cached("llama3-8b", 64, 4096, 1.0, 3e12) == dense  # every group: no router runs
    assert 16.0 < dense < 17.0 and 1.45 < dense / half < 1.55  # the ~1.5x ceiling POLAR.md gives


def test_mlp_density_lowers_the_floor_by_mlp_bytes():
    full = bench.step_floor_ms_cached("opt-6.7b", 64, 1920, 0.5, 3e12)
    sparse = bench.step_floor_ms_cached("opt-6.7b", 64, 1920, 0.5, 3e12, 0.3)
    mlp_ms = 1e3 * 31 * 2 * 4096 * 16384 * 2 / 3e12  # fc1 + fc2 of layers 1..31, bf16
    router_ms = 1e3 * 31 * (4096 * 1024 + 1024 * 16384 + 16384) * 2 / 3e12  # rank-1024 MLP routers, layers 1..31
    assert math.isclose(full - sparse, 0.7 * mlp_ms - router_ms, rel_tol=1e-9)


def test_router_parameters_counts_what_for_model_builds(tiny_shape):
    from polar_compile.model_info import describe_model
    from polar_compile.routers.modules import PolarRouters, router_parameters

    model = bench.build_model(tiny_shape, 64, dtype=torch.float32, device="cpu")
    info = describe_model(model)
    for mlp, rank in ((False, None), (True, None), (True, 8)):
        routers = PolarRouters.for_model(model, density=0.5, mlp=mlp, mlp_rank=rank, mlp_density=0.5 if mlp else None)
        counted = router_parameters(
            info.hidden_size, info.num_groups, attention_layers=len(routers.attention), mlp_layers=len(routers.mlp),
            mlp_rank=routers.metadata["mlp_rank"], intermediate_size=info.intermediate_size,
        )  # fmt: skip
        assert counted == sum(p.numel() for p in routers.parameters()), (mlp, rank)


def test_lean_loop_runs_the_graph_generate_compiled(tiny_shape):
    # The lean loop calls the compiled step with generate's keywords and strides: one decode graph for both loops
    # (with transformers 5.25 it compiled a second one: generate passes logits_to_keep, and its position_ids have
    # strides (1, 1) where the loop's slice of an expanded tensor had (0, 1)).
    from torch._dynamo.utils import counters

    counters.clear()
    results = bench.run(
        [tiny_shape], [2], [24], ["polar-1.0"], new_tokens=6, bandwidth=3e12, csv_path=None, device="cpu"
    )
    assert [r.loop for r in results] == ["generate", "lean"]
    assert counters["stats"]["unique_graphs"] == 1


def test_run_measures_every_system_in_both_loops_on_cpu(tiny_shape, tmp_path):
    systems = ["stock", "eager", "polar-1.0", "polar-paper", "polar-paper-mlp"]
    results = bench.run(
        [tiny_shape],
        [2],
        [24],
        systems,
        new_tokens=6,
        bandwidth=3e12,
        csv_path=tmp_path / "decode.csv",
        mlp_density=0.5,
        device="cpu",
    )
    expected = [(s, loop) for s in systems for loop in ("generate", "lean") if (s, loop) != ("eager", "generate")]
    assert [(r.system, r.loop) for r in results] == expected
    row = {(r.system, r.loop): r for r in results}
    assert row["polar-1.0", "generate"].tokens_equal_to_stock == 1.0  # density 1.0 reproduces dense greedy tokens
    assert row["polar-1.0", "lean"].argmax_equal_forced == 1.0
    assert row["polar-1.0", "lean"].logit_error < 1e-4  # fp32 on the CPU
    assert row["eager", "lean"].argmax_equal_forced == 1.0 and row["eager", "lean"].logit_error < 1e-4
    assert row["polar-paper", "lean"].logit_error > 1e-3  # half the groups dropped: the logits move
    assert all(r.ms_per_step > 0 and r.graphs_compiled_measured == 0 for r in results)
    assert row["polar-paper-mlp", "lean"].mlp_density == 0.5 and row["polar-paper", "lean"].mlp_density == 1.0
    assert row["polar-paper", "lean"].layers_rewritten == "2/0"
    assert row["polar-paper-mlp", "generate"].layers_rewritten == "2/2"
    assert (tmp_path / "decode.csv").read_text().count("\n") == 10


@pytest.mark.parametrize("batch", [1, 2])
def test_a_polar_system_compiles_the_model_once_at_a_grid_point(tiny_shape, batch):
    """Chunked prefill stays eager, and the lean loop's first token has the strides of every later one (the
    compiled step guards on them, at B=1 too, where a sliced token is "contiguous" with another stride): one
    whole-model compile a point, where there were four (two chunk lengths, the first step's sliced token, the
    rest)."""
    from torch._dynamo.utils import counters

    import polar_compile

    model = bench.build_model(tiny_shape, 24, dtype=torch.float32, device="cpu")
    polar_compile.optimize(model, bench.random_routers(model, 0.5), polar_compile.SparsityConfig(0.5))
    before = counters["stats"]["unique_graphs"]
    run = bench.lean_decode(model, bench.decode_call(model), batch, 24, 6, prefill_chunk=4)  # 14 prompt: 4,4,4,2
    assert counters["stats"]["unique_graphs"] - before == 1 and run.graphs_compiled == 0


@pytest.fixture(params=["llama", "opt"])
def tiny_any_shape(request, monkeypatch):
    """A tiny Llama (positions from the cache) and a tiny OPT (positions from the attention mask, when given none)."""
    if request.param == "llama":
        return request.getfixturevalue("tiny_shape")
    fields = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, vocab_size=256,
                  max_position_embeddings=512, word_embed_proj_dim=64)  # fmt: skip
    monkeypatch.setitem(bench.MODEL_SHAPES, "tiny-opt", ("OPTConfig", fields))
    return "tiny-opt"


def test_lean_loop_decodes_the_tokens_generate_decodes(tiny_any_shape):
    """The lean loop is the same greedy decode as generate, minus generate's per-step host work (for OPT too: its
    positions come from a 2-D attention mask unless the loop passes them; session 5 found OPT's lean loop broken)."""
    tiny_shape = tiny_any_shape
    model = bench.build_model(tiny_shape, 32, dtype=torch.float32, device="cpu")
    lean = bench.lean_decode(model, bench.decode_call(model), 2, 32, 5, warmup=3, prefill_chunk=0)
    prompt = 32 - 8 - 1
    ids = torch.randint(10, model.config.vocab_size, (2, prompt), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=9, do_sample=False,
                         cache_implementation="static")  # fmt: skip
    generated = out[:, prompt:]
    assert torch.equal(lean.inputs, generated[:, :8])  # fed tokens: prefill's token, then each step's argmax
    assert torch.equal(lean.argmax, generated[:, 4:9])  # measured steps 3..7 produce tokens 4..8
    forced = torch.randint(10, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    teacher = bench.lean_decode(model, bench.decode_call(model), 2, 32, 5, warmup=3, forced=forced, prefill_chunk=0)
    assert torch.equal(teacher.inputs, forced)


def test_append_csv_migrates_an_older_header_and_refuses_a_foreign_one(tmp_path):
    import csv
    import dataclasses

    @dataclasses.dataclass
    class Old:
        a: int
        b: int

    @dataclasses.dataclass
    class New:
        a: int
        b: int
        c: str = ""

    path = tmp_path / "rows.csv"
    bench.append_csv(path, [Old(1, 2)])
    bench.append_csv(path, [New(3, 4, "x")])
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows == [{"a": "1", "b": "2", "c": ""}, {"a": "3", "b": "4", "c": "x"}]

    @dataclasses.dataclass
    class Other:
        a: int
        z: int

    with pytest.raises(ValueError, match=r"columns \['b', 'c'\]"):
        bench.append_csv(path, [Other(5, 6)])

    # dict rows (the kernel benches' rows) take the same path, and must agree on their columns
    bench.append_csv(path, [{"a": 7, "b": 8, "c": "y", "d": 9}])
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[-1] == {"a": "7", "b": "8", "c": "y", "d": "9"} and rows[0]["d"] == ""
    with pytest.raises(ValueError, match="same columns"):
        bench.append_csv(path, [{"a": 1, "b": 2, "c": "", "d": 3}, {"b": 2, "a": 1, "c": "", "d": 3}])


@pytest.mark.parametrize("system", ["polar-1.0", "eager"])
def test_run_prefills_opt_in_one_piece_only_where_hf_compiles_the_chunks(tiny_any_shape, system, monkeypatch):
    """OPT's mask code fails under compile in a chunked prefill (seen on the GPU, session 6): run() must not ask
    HF's own generate (stock, eager) for one. A polar system's prefill chunks run eagerly, so it keeps the chunk
    asked for (OPT-6.7B B=64 x 1,920 fits an H100 only so); other models keep it in every system."""
    seen = []
    real = bench.lean_decode

    def recording(*args, **kwargs):
        seen.append(kwargs["prefill_chunk"])
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "lean_decode", recording)
    bench.run(
        [tiny_any_shape],
        [2],
        [32],
        [system],
        new_tokens=4,
        bandwidth=1e11,
        csv_path=None,
        device="cpu",
        prefill_chunk=8,
        loops=("lean",),
    )
    assert seen == [0 if tiny_any_shape == "tiny-opt" and system == "eager" else 8]


def test_prefill_chunk_for_keeps_one_piece_only_where_hf_compiles_opt():
    """The stock system is too slow to compile on the CPU for the run() test above: the rule itself, every system."""
    for system in ("stock", "eager", "polar-1.0", "polar-paper", "polar-paper-mlp"):
        hf_compiles = system in ("stock", "eager")
        assert bench.prefill_chunk_for("opt", system, 256) == (0 if hf_compiles else 256), system
        assert bench.prefill_chunk_for("llama", system, 256) == 256, system


def test_a_polar_system_decodes_opt_alike_after_a_chunked_and_a_one_piece_prefill(tiny_any_shape):
    """What the chunk rule above relies on: with polar's generate, OPT's chunked prefill (eager) fills the static
    cache as one piece does, so the compiled decode steps after it give the same logits and tokens."""
    import polar_compile

    model = bench.build_model(tiny_any_shape, 32, dtype=torch.float32, device="cpu")
    polar_compile.optimize(model, bench.random_routers(model, 0.5), polar_compile.SparsityConfig(0.5))
    eager_forwards = []  # tokens per sequence of each forward that ran eagerly (a compiled step records nothing)
    model.get_input_embeddings().register_forward_pre_hook(
        lambda module, args: None if torch.compiler.is_compiling() else eager_forwards.append(args[0].shape[1])
    )
    runs = []
    for chunk, pieces in ((0, [23]), (8, [8, 8, 7])):  # the 23-token prompt as one piece, then in chunks
        eager_forwards.clear()
        runs.append(bench.lean_decode(model, bench.decode_call(model), 2, 32, 5, keep_logits=3, prefill_chunk=chunk))
        assert eager_forwards == pieces  # the prefill as asked, and every decode step through the compiled forward
    assert runs[0].logits.shape[1] == 3
    torch.testing.assert_close(runs[1].logits, runs[0].logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(runs[1].argmax, runs[0].argmax) and torch.equal(runs[1].inputs, runs[0].inputs)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bandwidth", "0"], "--bandwidth must be > 0"),
        (["--bandwidth", "nan"], "--bandwidth must be > 0"),
        (["--systems", "polar-9"], "unknown systems"),
        (["--models", "gpt-5"], "unknown models"),
        (["--budget-s", "0"], "--budget-s must be > 0"),
        (["--missing-only", "--csv", ""], "--missing-only reads"),
        (["--loops", "lean,fast"], "unknown loops \\['fast'\\]"),
        (["--batch", "abc"], "--batch takes a comma list of whole numbers"),
        (["--context", "4096,0"], "--context takes numbers >= 1"),
        (["--new-tokens", "2"], "--new-tokens must be >= 3"),
        (["--context", "4096,28", "--new-tokens", "24"], "--context 28 leaves no prompt: .* at least 29"),
        (
            ["--context", "24", "--new-tokens", "24", "--loops", "generate"],
            "--context 24 leaves no prompt: .* at least 25",
        ),
        (["--mlp-density", "7"], "--mlp-density must be in"),
        (["--prefill-chunk", "-1"], "--prefill-chunk must be >= 0"),
        (["--csv", "{foreign}"], ".*foreign.csv has columns \\['other'\\] that these rows lack"),
        (["--csv", "{tmp}"], "--csv .* is a folder: name a file in it"),
        (
            ["--csv", "{foreign}/deeper/decode.csv"],
            "--csv .*foreign.csv/deeper/decode.csv: .*foreign.csv is a file, not a",
        ),
        (
            ["--csv", "{text}"],
            ".*text.csv has columns \\['" + "w" * 40 + "\\.\\.\\.'\\] that these rows lack: is it another",
        ),
    ],
)
def test_bench_cli_names_bad_arguments_before_looking_for_a_gpu(argv, message, tmp_path):
    import argparse

    from polar_compile.bench import add_bench_parser

    foreign = tmp_path / "foreign.csv"
    foreign.write_text("gpu,other\nx,1\n")
    (tmp_path / "text.csv").write_text("w" * 30_000 + "\n")  # not a CSV: its first line is not quoted whole
    parser = argparse.ArgumentParser()
    add_bench_parser(parser)
    paths = {"{foreign}": str(foreign), "{tmp}": str(tmp_path), "{text}": str(tmp_path / "text.csv")}
    for key, path in paths.items():
        argv = [part.replace(key, path) for part in argv]
    args = parser.parse_args(argv)
    assert parser.parse_args([]).bandwidth is None  # measured on the GPU unless given
    with pytest.raises(SystemExit, match=f"^polar-compile bench: {message}"):
        args.func(args)


@pytest.mark.parametrize("argv, chunk", [([], 1024), (["--prefill-chunk", "256"], 256), (["--prefill-chunk", "0"], 0)])
def test_bench_cli_passes_the_prefill_chunk_to_the_grid(argv, chunk, monkeypatch):
    """--prefill-chunk bounds the untimed prefill's memory (Llama-2-7B B=32 x 4096 leaves ~2.5 GiB of an H100 80GB
    beside its 64 GiB cache); the grid must get the value asked for."""
    import argparse

    seen = {}
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "run", lambda *args, **kwargs: seen.update(kwargs) or [])
    parser = argparse.ArgumentParser()
    bench.add_bench_parser(parser)
    args = parser.parse_args(["--csv", "", "--bandwidth", "3e12", *argv])
    assert args.func(args) == 0
    assert seen["prefill_chunk"] == chunk


def test_with_layers_registers_a_shorter_shape_and_keeps_the_original():
    assert bench.with_layers("llama2-7b", None) == "llama2-7b"
    short = bench.with_layers("llama2-7b", 8)
    assert bench.MODEL_SHAPES[short][1]["num_hidden_layers"] == 8
    assert bench.MODEL_SHAPES["llama2-7b"][1]["num_hidden_layers"] == 32
    assert bench.MODEL_SHAPES[short][0] == bench.MODEL_SHAPES["llama2-7b"][0]
    assert bench.PAPER_DENSITY[short] == bench.PAPER_DENSITY["llama2-7b"]


@pytest.fixture
def slow_systems(monkeypatch):
    """Every system "takes" 100 s of a fake clock (advanced by each lean loop), and each lean loop is recorded."""
    now, calls = [0.0], []
    real = bench.lean_decode

    def timed(model, call, batch, context, *args, **kwargs):
        calls.append(batch)
        now[0] += 100.0
        return real(model, call, batch, context, *args, **kwargs)

    monkeypatch.setattr(bench, "_clock", lambda: now[0])
    monkeypatch.setattr(bench, "lean_decode", timed)
    return calls


def run_lean(shape, batches, systems, csv_path, **options):
    """bench.run's lean loop on the CPU at one 24-token context, 3 new tokens: the grid bookkeeping tests."""
    return bench.run(
        [shape], batches, [24], systems, new_tokens=3, bandwidth=1e11, csv_path=csv_path, device="cpu",
        loops=("lean",), **options,
    )  # fmt: skip


def test_budget_stops_before_a_system_that_would_not_fit(tiny_shape, tmp_path, slow_systems):
    csv_path = tmp_path / "decode.csv"
    # 250 s: points B=1 and B=2 run (100 s each), B=3 would end at 300 s, so it is not started.
    results = run_lean(tiny_shape, [1, 2, 3], ["eager"], csv_path, budget_s=250)
    assert slow_systems == [1, 2] and [r.batch for r in results] == [1, 2]
    assert len(bench.measured_rows(csv_path, "cpu")) == 2
    # Inside a point: the first system (100 s) fits 150 s, the second would not; the first one's row is written.
    slow_systems.clear()
    results = run_lean(tiny_shape, [4, 5], ["eager", "eager"], csv_path, budget_s=150)
    assert slow_systems == [4] and [(r.batch, r.system) for r in results] == [(4, "eager")]
    assert (tiny_shape, 4, 24, "eager", "lean") in bench.measured_rows(csv_path, "cpu")


def test_rows_carry_the_seconds_each_system_took_and_old_files_gain_the_column(tiny_shape, tmp_path, slow_systems):
    csv_path = tmp_path / "decode.csv"
    old = dict.fromkeys(f.name for f in dataclasses.fields(bench.DecodeResult) if f.name != "system_s")
    bench.append_csv(csv_path, [dict(old, gpu="cpu", model="old")])  # a file from before the column
    results = run_lean(tiny_shape, [1, 2], ["eager"], csv_path)
    assert [r.system_s for r in results] == [100.0, 100.0]  # the fake clock: 100 s a lean loop
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["system_s"] for row in rows] == ["", "100.0", "100.0"]


def test_missing_only_measures_the_points_this_gpu_lacks(tiny_shape, tmp_path, slow_systems):
    csv_path = tmp_path / "decode.csv"
    run_lean(tiny_shape, [1], ["eager"], csv_path)
    assert bench.measured_rows(csv_path, "another GPU") == set()
    slow_systems.clear()
    run_lean(tiny_shape, [1, 2], ["eager"], csv_path, missing_only=True)
    assert slow_systems == [2]
    assert bench.measured_rows(csv_path, "cpu") == {(tiny_shape, b, 24, "eager", "lean") for b in (1, 2)}
    # A point is measured again when a system or loop asked for is missing from it.
    slow_systems.clear()
    run_lean(tiny_shape, [1, 2], ["eager", "polar-1.0"], csv_path, missing_only=True, budget_s=150)
    assert slow_systems == [1]  # B=1 again, stopped by the budget before polar-1.0 compiled


def test_rows_of_the_cublas_arm_are_named_apart_from_the_default(tiny_shape, tmp_path):
    """--no-skinny-linears rows were written under the default's system names: appended to decode.csv they passed
    for the default configuration. They are named "+cublas" now, compared with their own arm's density 1.0, and
    --missing-only tells the two arms apart."""
    csv_path = tmp_path / "decode.csv"
    systems = ["eager", "polar-1.0", "polar-paper"]
    results = run_lean(tiny_shape, [2], systems, csv_path, skinny_linears=False)
    assert [r.system for r in results] == ["eager", "polar-1.0+cublas", "polar-paper+cublas"]
    assert all(math.isfinite(r.speedup_vs_polar_dense) for r in results)
    arm = {(tiny_shape, 2, 24, s, "lean") for s in ("eager", "polar-1.0+cublas", "polar-paper+cublas")}
    assert bench.measured_rows(csv_path, "cpu") == arm
    assert run_lean(tiny_shape, [2], systems, csv_path, skinny_linears=False, missing_only=True) == []
    rerun = run_lean(tiny_shape, [2], ["polar-1.0"], csv_path, missing_only=True)
    assert [r.system for r in rerun] == ["polar-1.0"]  # the default arm is not measured yet


@pytest.mark.parametrize("name", sorted(bench.MODEL_SHAPES))
def test_every_bench_shape_is_a_model_polar_compile_describes(name):
    """Built on the meta device (no memory): the published shapes, and the layers the passes will look for."""
    import transformers

    from polar_compile.model_info import describe_model

    config_name, fields = bench.MODEL_SHAPES[name]
    config = getattr(transformers, config_name)(**fields)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    info = describe_model(model)
    assert (info.hidden_size, info.num_layers) == (fields["hidden_size"], fields["num_hidden_layers"])
    assert info.num_kv_heads == fields.get("num_key_value_heads", fields["num_attention_heads"])
    assert bench.PAPER_DENSITY[name] == 0.5


def test_a_system_that_runs_out_of_memory_is_skipped_and_the_others_are_written(
    tiny_shape, tmp_path, monkeypatch, capsys
):
    """An out-of-memory in one system's lean loop, after its generate loop was measured, crashed the grid point
    (KeyError: 'rewritten') and lost every system's rows. The skip names the allocation that failed."""
    real = bench.lean_decode
    calls = []

    def lean_decode(model, call, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # polar-1.0's lean loop (stock's is the first)
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                "capacity of 79.19 GiB of which 1.12 GiB is free."
            )  # torch's wording
        return real(model, call, *args, **kwargs)

    monkeypatch.setattr(bench, "lean_decode", lean_decode)
    results = bench.run(
        [tiny_shape],
        [2],
        [24],
        ["stock", "polar-1.0", "polar-paper"],
        new_tokens=6,
        bandwidth=3e12,
        csv_path=tmp_path / "d.csv",
        device="cpu",
    )
    assert [(r.system, r.loop) for r in results] == [
        ("stock", "generate"), ("stock", "lean"), ("polar-paper", "generate"), ("polar-paper", "lean")
    ]  # fmt: skip
    assert (tmp_path / "d.csv").read_text().count("\n") == 5
    said = capsys.readouterr().out
    assert "polar-1.0: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB), skipped" in said
    assert "--prefill-chunk" not in said  # 24 tokens of context: nothing to chunk


@pytest.mark.parametrize(
    ("chunk", "context", "hint"),
    [
        (1024, 4096, "; prefill ran in chunks of up to 1024 tokens: a smaller --prefill-chunk may fit"),
        (1024, 512, "; prefill ran in chunks of up to 512 tokens: a smaller --prefill-chunk may fit"),
        (256, 4096, ""),
        (0, 4096, ""),  # one piece (OPT): no chunk to make smaller
        (1024, 24, ""),
    ],
)
def test_an_out_of_memory_skip_suggests_a_smaller_prefill_chunk_only_where_one_would_help(chunk, context, hint):
    assert bench._oom_hint(chunk, context) == hint


_HELP_ALL_SCRIPTS = """
import contextlib, io, runpy, sys
from pathlib import Path
failed = []
for script in sorted(Path("benchmarks").glob("*.py")):
    sys.argv = [str(script), "--help"]
    saved_path = list(sys.path)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as shown:
            runpy.run_path(str(script), run_name="__main__")
        failed.append(f"{script.name}: returned without --help's exit")
    except SystemExit as stop:
        if stop.code not in (0, None) or "usage:" not in shown.getvalue():
            failed.append(f"{script.name}: exit {stop.code!r}")
    except Exception as error:  # noqa: BLE001 (each script's failure is reported by name)
        failed.append(f"{script.name}: {type(error).__name__}: {error}")
    finally:
        sys.path[:] = saved_path
print("\\n".join(failed))
"""


def test_every_benchmark_script_answers_help_without_a_gpu():
    """`python benchmarks/X.py --help` prints its usage on a CPU-only machine for every script (the GPU-only ones
    check for CUDA after parsing their arguments, bench.require_cuda). One interpreter runs them all, without
    TRITON_INTERPRET (inspect_kernels.py refuses it at import)."""
    root = Path(__file__).resolve().parents[1]
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}  # inspect_kernels.py
    done = subprocess.run([sys.executable, "-c", _HELP_ALL_SCRIPTS], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "", done.stdout


def test_require_cuda_names_the_script_when_no_gpu_is_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"probe_x\.py needs a CUDA GPU"):
        bench.require_cuda("/somewhere/benchmarks/probe_x.py")


def _read_ceiling():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_read_ceiling

    return bench_read_ceiling


@pytest.mark.triton_kernel
@pytest.mark.parametrize(("n", "block", "blocks"), [(1, 16, 1), (1000, 64, 1), (5000, 64, 4), (4096, 256, 2)])
def test_read_ceiling_kernel_reads_every_element_once(kernel_device, n, block, blocks):
    rc = _read_ceiling()
    x = torch.randint(-1000, 1000, (n,), dtype=torch.int32, device=kernel_device)
    out = rc.launch_read(x, None, block, blocks, 4)
    assert out.numel() == -(-n // (block * blocks))
    assert int(out.sum()) == int(x.sum())  # every element exactly once: a skipped or doubled block changes the sum
    with pytest.raises(ValueError, match="int32"):
        rc.launch_read(x.float(), None, block, blocks, 4)


def test_read_ceiling_report_compares_each_target_row_at_its_own_bytes(tmp_path, monkeypatch):
    rc = _read_ceiling()
    gpu = "NVIDIA H100 80GB HBM3"
    attention = [  # a missed 2.7 row, a 0.25 row, and rows outside the targets (B=1; L=1024)
        dict(model="m", batch=16, valid_len=4096, k=4, density=0.5, ours_bytes=100, ours_tbps=2.0),
        dict(model="m", batch=16, valid_len=4096, k=2, density=0.25, ours_bytes=50, ours_tbps=2.5),
        dict(model="m", batch=1, valid_len=4096, k=4, density=0.5, ours_bytes=7, ours_tbps=0.5),
        dict(model="m", batch=16, valid_len=1024, k=4, density=0.5, ours_bytes=9, ours_tbps=0.5),
    ]
    gemm = [  # up + down = mlp at one point; an M = 128 row outside the target; a later run with an ascending index
        dict(model="g", M=16, density=0.1, op="up", impl="selective", weight_bytes=40, tbps=1.0, index_order="random"),
        dict(
            model="g", M=16, density=0.1, op="down", impl="selective", weight_bytes=20, tbps=1.0, index_order="random"
        ),
        dict(model="g", M=16, density=0.1, op="mlp", impl="selective", weight_bytes=60, tbps=1.0, index_order="random"),
        dict(model="g", M=128, density=0.1, op="up", impl="selective", weight_bytes=40, tbps=1.0, index_order="random"),
        dict(
            model="g", M=16, density=0.1, op="up", impl="selective", weight_bytes=40, tbps=1.9, index_order="ascending"
        ),
    ]
    ceiling = [  # the fastest impl at a size is the ceiling (copy wins at 40 B); 52 B measured on an H200 only
        dict(bytes=100, impl="triton", tbps=3.0),
        dict(bytes=100, impl="torch.sum", tbps=2.5),
        dict(bytes=100, impl="copy", tbps=2.9),
        dict(bytes=40, impl="triton", tbps=1.5),
        dict(bytes=40, impl="copy", tbps=2.0),
        dict(bytes=20, impl="torch.sum", tbps=1.0),
        dict(bytes=52, impl="triton", tbps=3.0, gpu="NVIDIA H200"),
    ]
    for name, rows in (("selective_attention", attention), ("selective_gemm", gemm), ("read_ceiling", ceiling)):
        with (tmp_path / f"{name}.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["gpu", *rows[0]])
            writer.writeheader()
            writer.writerows({"gpu": gpu, **row} for row in rows)  # a row's own gpu wins
    report = {row["name"]: row for row in rc.report(tmp_path)}
    assert sorted(report) == [
        "attention m B=16 L=4096 k=2",
        "attention m B=16 L=4096 k=4",
        "gemm g down M=16 density=0.1",
        "gemm g mlp M=16 density=0.1",
        "gemm g up M=16 density=0.1",
    ]
    assert report["attention m B=16 L=4096 k=4"]["target"] == 2.7
    assert report["attention m B=16 L=4096 k=4"]["ceiling"] == 3.0  # the fastest of the three
    assert report["attention m B=16 L=4096 k=2"]["target"] == 2.4
    assert report["attention m B=16 L=4096 k=2"]["ceiling"] is None  # 52 B (50 in int32s) measured on an H200 only
    assert report["gemm g up M=16 density=0.1"]["ceiling"] == 2.0
    assert report["gemm g up M=16 density=0.1"]["ours"] == 1.0  # the random-order run, the benchmark's default
    assert report["gemm g down M=16 density=0.1"]["ceiling"] == 1.0
    # up + down: two launches, 40 B at 2.0 and 20 B at 1.0 take 20 + 20 time units for 60 B
    assert report["gemm g mlp M=16 density=0.1"]["ceiling"] == pytest.approx(1.5)
    assert rc.target_bytes(tmp_path) == {100, 50, 40, 20}
    monkeypatch.setattr(rc, "MAX_BYTES", 40)  # rows above the largest size measured take its rate
    assert {row["name"]: row["ceiling"] for row in rc.report(tmp_path)}["attention m B=16 L=4096 k=4"] == 2.0


def test_split_fit_recovers_the_rule_that_made_the_times(tmp_path, capsys):
    """fit_attention_splits --fit: grids whose fastest split count is what one rule of the sweep implies are fitted
    by a rule that loses nothing on any of them, and the rule the times came from is among the best."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fit_attention_splits as fas

    from polar_compile.ops import selective_attention as sa

    truth = dict(saturating_per_sm=1.5, overhead_keys=256, min_keys_per_split=128)
    entry = dataclasses.replace(sa._config_table()["gqa-d128"], **truth)
    grids = []
    for pairs, cache_len in [(2, 4352), (8, 1280), (32, 4352), (64, 4352), (72, 16640), (160, 4352), (320, 16640)]:
        best = sa.num_splits_with(entry, pairs, cache_len, sm_count=132)
        times = {str(s): 1.0 + 0.1 * abs(math.log(s / best)) for s in fas.SPLIT_COUNTS}
        grids.append(dict(shape=f"x:{pairs}", key="gqa-d128", pairs=pairs, cache_len=cache_len, cudnn_ms=1.0,
                          rule=best, times=times))  # fmt: skip
    assert fas.rule_losses(grids, 132, **truth) == [1.0] * len(grids)
    ranked = fas.fit(grids, 132)
    assert ranked[0][:2] == (1.0, 1.0)
    assert truth in [rule for mean, worst, rule in ranked if worst == 1.0]
    other = dict(saturating_per_sm=3.0, overhead_keys=0, min_keys_per_split=32)  # splits far more
    assert max(fas.rule_losses(grids, 132, **other)) > 1.0
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"gpu": "test", "grids": grids}))
    fas.report(path, 132)
    said = capsys.readouterr().out
    assert "7 grids measured on test" in said and "x:320" in said


def test_plot_decode_names_each_loop_its_own_png():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import plot_decode

    csv_path = Path("results/decode.csv")
    assert plot_decode.default_png(csv_path, "generate") == Path("results/decode.png")
    assert plot_decode.default_png(csv_path, "lean") == Path("results/decode_lean.png")
    assert plot_decode.default_png(csv_path, "generate-synced") == Path("results/decode_generate-synced.png")


_README_MODELS = {
    "Llama-3-8B": "llama3-8b", "Llama-2-7B": "llama2-7b", "OPT-6.7B": "opt-6.7b", "Mistral-7B": "mistral-7b",
    "Qwen2-7B": "qwen2-7b", "Phi-3-mini": "phi3-mini", "Mixtral-8x7B": "mixtral-8x7b",
}  # fmt: skip
_README_GPUS = {"H100": "NVIDIA H100 80GB HBM3", "H200": "NVIDIA H200"}


def _tokens_per_s(cell: str) -> list[int | None]:
    """'3,526 / 3,683 (4 of 8 groups)' -> [3526, 3683]; '-' -> None."""
    parts = [part.strip() for part in cell.split(" (")[0].split("/")]
    return [None if part == "-" else int(part.replace(",", "")) for part in parts]


def test_readme_results_table_is_rows_of_decode_csv():
    """Every tokens/s number in the README's results table is a row of benchmarks/results/decode.csv (same GPU,
    model, system, loop, batch and context, rounded to the token), and each "sparse vs 1.0" ratio is the ratio of
    its row's numbers: nothing in the table is typed by hand or left behind by a newer run's edit."""
    root = Path(__file__).resolve().parents[1]
    with open(root / "benchmarks/results/decode.csv", newline="") as handle:
        measured = list(csv.DictReader(handle))
    lines = (root / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| GPU | model shape |"))
    table = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    assert len(table) >= 10
    missing = []
    for gpu, shape, point, stock, dense, sparse, ratio, _ in table:
        batch, context = point.split(" x ")
        key = dict(gpu=_README_GPUS[gpu], model=_README_MODELS[shape.split(" (")[0]], batch=batch, context=context)
        for system, cell in (("stock", stock), ("polar-1.0", dense), ("polar-paper", sparse)):
            values = _tokens_per_s(cell)
            for loop, value in zip(["generate", "lean"] if len(values) == 2 else ["generate"], values):
                rows = [r for r in measured if r["system"] == system and r["loop"] == loop]
                found = [float(r["tokens_per_s"]) for r in rows if all(r[name] == want for name, want in key.items())]
                if value is not None and not any(abs(tokens - value) <= 0.5 for tokens in found):
                    missing.append(f"{gpu} {shape} {point} {system} {loop}: {value} not in {[round(t) for t in found]}")
        ratios = [None if part.strip() == "-" else float(part.strip().rstrip("x")) for part in ratio.split("/")]
        for dense_tokens, sparse_tokens, shown in zip(_tokens_per_s(dense), _tokens_per_s(sparse), ratios):
            if shown is not None and abs(sparse_tokens / dense_tokens - shown) > 0.006:
                missing.append(f"{gpu} {shape} {point}: ratio {shown} against {sparse_tokens / dense_tokens:.3f}")
    assert not missing, "\n".join(missing)
