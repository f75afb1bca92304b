"""The command line and the entry point, as a user calls them (fresh processes)."""

import importlib.metadata
import subprocess
import sys

import pytest


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def test_help():
    """Every command's --help, in one fresh process (each launch costs seconds of imports)."""
    code = """
import contextlib, io
from graph_moe.tools.cli import main
for command in (["demo"], ["explain"], ["dump"], ["bench"], ["bench", "layer"], ["bench", "compile"], ["bench", "step"],
                ["bench", "memory"], ["bench", "decode"], ["bench", "sft"], ["bench", "--compile-time"]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main([*command, "--help"])
    assert "usage: " + " ".join(["graph-moe", *command]).replace("--compile-time", "compile") in out.getvalue(), (
        command, out.getvalue())
print("ok")
"""
    proc = _run("-c", code)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
    assert _run("-m", "graph_moe", "--help").stdout.startswith("usage: graph-moe")


def test_explain_cli_reports_each_loop():
    proc = _run("-m", "graph_moe", "explain", "--model", "mixtral", "--layers", "2", "--experts", "4",
                "--hidden", "32", "--intermediate", "32", "--tokens", "8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("-> grouped GEMMs") == 2 and "2 of 2 loop(s) rewritten" in proc.stdout


def test_backend_name_works_without_importing_graph_moe():
    """`backend="graph_moe"` resolves through the torch_dynamo_backends entry point (of the installed package: run
    from a checkout on PYTHONPATH, as on the GPU machine, there is no entry point to test)."""
    try:
        importlib.metadata.distribution("graph_moe")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("graph_moe is not installed (pip install -e .): no entry points")
    code = """
import torch
torch._dynamo.config.capture_dynamic_output_shape_ops = True
import sys; sys.path.insert(0, "tests")
assert "graph_moe" not in sys.modules
from moe_blocks import RangeMoE
m = RangeMoE(num_experts=4, top_k=2).to(torch.bfloat16)
x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
out = torch.compile(m, backend="graph_moe")(x)
from torch._dynamo.utils import counters
assert counters["graph_moe"]["loops_rewritten"] == 1, counters["graph_moe"]
torch.testing.assert_close(out.float(), m(x).float(), atol=3e-2, rtol=3e-2)
print("ok")
"""
    proc = _run("-c", code)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_bench_compile_time_runs_on_the_cpu(tmp_path):
    """`graph-moe bench compile` at a tiny shape on this CPU (aot_eager after the pass: Inductor's C++ compile
    would take a minute): the JSON of every number under the run's facts, a table, the loops rewritten, and after
    the one dynamic recompile at the first new sequence length, no more graphs."""
    out = tmp_path / "compile.json"
    proc = _run("-m", "graph_moe", "bench", "compile", "--layers", "2", "--variants", "graph_moe", "--experts",
                "4", "--top-k", "2", "--hidden", "32", "--intermediate", "32", "--vocab", "64", "--tokens", "16",
                "--lengths", "3", "--device", "cpu", "--inner", "aot_eager", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    header, row = json.loads(out.read_text())
    assert header["card"] == "cpu" and row["layers"] == 2 and row["variant"] == "graph_moe"
    assert header["command"].startswith("graph-moe bench compile --layers 2 --variants graph_moe")
    assert header["commit"] and header["date"].endswith("+00:00") and header["torch"] and header["transformers"]
    assert row["loops_rewritten"] >= 1 and row["loops_skipped"] == 0
    assert row["compile_s"] > 0 and len(row["length_steps_s"]) == 3
    phases = row["first_compile_phases_s_total_max"]  # where the first compile went: Dynamo's trace among them
    assert 0 < phases["bytecode_tracing"][0] <= row["first_step_s"]
    assert row["graphs_compiled_over_lengths"] <= 1  # regional: one graph serves both layers at every length
    assert "| 2 | graph_moe |" in proc.stdout


def test_bench_compile_time_runs_each_model_in_a_fresh_process(tmp_path):
    """Two models: each is timed in its own process (a compile leaves the next one warm), and the JSON holds both,
    each with its process's warm-up time, under the command as the user gave it (`--compile-time`: the form before
    subcommands)."""
    out = tmp_path / "compile.json"
    proc = _run("-m", "graph_moe", "bench", "--compile-time", "--layers", "1", "--variants", "graph_moe", "dense",
                "--experts", "4", "--top-k", "2", "--hidden", "32", "--intermediate", "32", "--vocab", "64", "--tokens",
                "16", "--lengths", "0", "--device", "cpu", "--inner", "aot_eager", "--frozen-mlp", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    header, *rows = json.loads(out.read_text())
    assert header["each_in_a_fresh_process"] and header["frozen_mlp"] and header["experts"] == 4
    assert header["command"].startswith("graph-moe bench compile --layers 1 --variants graph_moe dense")
    assert [row["variant"] for row in rows] == ["graph_moe", "dense"]
    assert all(row["compile_s"] > 0 and row["process_warm_up_s"] > 0 for row in rows)
    assert rows[0]["loops_rewritten"] >= 1 and rows[1]["loops_found"] == 0
    assert "| 1 | graph_moe |" in proc.stdout and "| 1 | dense |" in proc.stdout


def test_bench_compile_time_backend_variant_compiles_the_whole_model(tmp_path):
    """The `backend` variant (graph_moe.backend on the whole model, as the HF Trainer's torch_compile does): one graph
    holding every layer's loop, each traced body by body and rewritten."""
    out = tmp_path / "compile.json"
    proc = _run("-m", "graph_moe", "bench", "--compile-time", "--layers", "2", "--variants", "backend", "--experts",
                "4", "--top-k", "2", "--hidden", "32", "--intermediate", "32", "--vocab", "64", "--tokens", "16",
                "--lengths", "0", "--device", "cpu", "--inner", "aot_eager", "--frozen-mlp", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    _, row = json.loads(out.read_text())
    assert row["variant"] == "backend" and row["compile_s"] > 0
    assert row["loops_found"] == row["loops_rewritten"] == 2 and row["loops_traced_once"] == 0


def test_bench_step_runs_on_the_cpu(tmp_path):
    """`graph-moe bench step` at a tiny shape on this CPU: a whole model's LoRA training step under graph_moe.compile
    against eager (the loss, every gradient compared), under the run's facts."""
    out = tmp_path / "step.json"
    proc = _run("-m", "graph_moe", "bench", "step", "--layers", "2", "--num-experts", "4", "--top-k", "2", "--hidden",
                "32", "--intermediate", "32", "--vocab", "64", "--tokens", "16", "--device", "cpu", "--inner", "aot_eager",
                "--experts", "lora", "--variants", "graph_moe", "--steps", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    record = json.loads(out.read_text())
    assert record["card"] == "cpu" and record["command"].startswith("graph-moe bench step --layers 2")
    assert [run["variant"] for run in record["runs"]] == ["graph_moe"]
    for run in record["runs"]:
        assert run["loops_rewritten"] >= 1 and run["loops_skipped"] == 0
        assert not run["missing_grads"] and run["grads_compared"] > 0
        assert abs(run["loss"] - record["eager_loss"]) < 1e-2
        assert run["warmup_steps"] >= 1 and run["graphs_compiled_while_timed"] == 0  # timed once compiled
    assert "| graph_moe |" in proc.stdout
    # the chart of the published step numbers, drawn from such records
    chart = tmp_path / "step.png"
    proc = _run("-m", "graph_moe", "bench", "chart", str(out), "--out", str(chart))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 10_000


def test_bench_step_records_a_failing_variant_and_measures_the_rest(tmp_path):
    """A variant that raises (here graph_moe with an inner compiler that does not exist) is recorded with its error,
    the variants after it still run, the chart leaves it out, and the command exits with status 1."""
    import json

    out = tmp_path / "step.json"
    proc = _run("-m", "graph_moe", "bench", "step", "--layers", "1", "--num-experts", "4", "--top-k", "2", "--hidden",
                "32", "--intermediate", "32", "--vocab", "64", "--tokens", "16", "--device", "cpu", "--inner",
                "no_such_compiler", "--experts", "full", "--variants", "graph_moe", "eager", "--steps", "1",
                "--json", str(out))
    assert proc.returncode == 1, proc.stderr[-3000:]
    failed, eager = json.loads(out.read_text())["runs"]
    assert failed["variant"] == "graph_moe" and "no_such_compiler" in failed["error"] and "step_ms" not in failed
    assert eager["variant"] == "eager" and eager["step_ms"] > 0 and eager["max_grad_rel_err"] == 0
    assert "| graph_moe | failed: ValueError" in proc.stdout and "graph_moe failed" in proc.stderr
    chart = tmp_path / "step.png"
    proc = _run("-m", "graph_moe", "bench", "chart", str(out), "--out", str(chart))
    assert proc.returncode == 0 and chart.exists(), proc.stderr[-3000:]


def test_bench_decode_runs_on_the_cpu(tmp_path):
    """`graph-moe bench decode` at a tiny shape: graph_moe's tokens equal eager's, with the same graphs for every
    layer (prefill and decode at batch 1, then again once the batch size changes)."""
    import json

    out = tmp_path / "decode.json"
    proc = _run("-m", "graph_moe", "bench", "decode", "--layers", "3", "--num-experts", "4", "--top-k", "2",
                "--hidden", "32", "--intermediate", "32", "--vocab", "64", "--batches", "1", "3", "--prompt", "5",
                "--new-tokens", "3", "--dtype", "float32", "--device", "cpu", "--inner", "aot_eager",
                "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["command"].startswith("graph-moe bench decode --layers 3")
    runs = {(r["variant"], r["batch"]): r for r in record["runs"]}
    assert all(r["tokens_equal_first_variant"] for r in record["runs"])
    assert runs["graph_moe", 1]["graphs_compiled"] == 2 and runs["graph_moe", 3]["graphs_compiled"] <= 4
    assert runs["graph_moe", 3]["loops_rewritten"] >= 1 and runs["graph_moe", 3]["loops_skipped"] == 0


def test_bench_sft_runs_on_the_cpu(tmp_path):
    """`graph-moe bench sft` at a tiny shape: TRL's SFTTrainer with and without graph_moe, the same losses."""
    import json

    out = tmp_path / "sft.json"
    proc = _run("-m", "graph_moe", "bench", "sft", "--layers", "2", "--num-experts", "4", "--top-k", "2", "--hidden",
                "32", "--intermediate", "32", "--vocab", "64", "--batch", "2", "--length", "16", "--steps", "3",
                "--warmup", "1", "--inner", "aot_eager", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    peft, ours = record["runs"]
    assert peft["variant"] == "peft" and ours["variant"] == "graph_moe" and ours["loops_rewritten"] >= 1
    assert all(abs(a - b) < 2e-2 for a, b in zip(peft["losses"], ours["losses"])) and len(ours["losses"]) == 3
    assert ours["tokens_per_s"] > 0


def test_bench_checks_each_variant_against_its_own_block():
    """`graph-moe bench layer` checks each variant's output against the eager block it was built from: a QLoRA variant
    compared with the frozen bf16 block differs by NF4 rounding + LoRA (0.22), which would read as a wrong result."""
    from graph_moe.tools.bench_layer import reference_kind

    kinds = {name: reference_kind(name) for name in (
        "graph_moe", "grouped_compiled", "hf_loop", "graph_moe_lora", "hf_loop_lora", "graph_moe_qlora",
        "graph_moe_qlora_whole_stacks", "graph_moe_per_expert_qlora", "hf_loop_qlora", "unsloth_qlora")}
    assert kinds == {"graph_moe": "", "grouped_compiled": "", "hf_loop": "", "graph_moe_lora": "lora",
                     "hf_loop_lora": "lora", "graph_moe_qlora": "qlora", "graph_moe_qlora_whole_stacks": "qlora",
                     "graph_moe_per_expert_qlora": "qlora", "hf_loop_qlora": "qlora", "unsloth_qlora": "qlora"}


def test_bench_variants_keep_their_own_dynamo_cache():
    """Closures made per variant share one code object, and Dynamo one cache per code object: each variant's call
    would check the others' guards first. `own_code` gives each compiled variant a cache of its own."""
    import torch
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from graph_moe.tools.bench_layer import own_code

    def variant(scale):
        def first_output(x):
            return x * scale
        return first_output

    x = torch.randn(4)
    shared = [variant(2.0), variant(3.0)]
    own = [own_code(variant(2.0)), own_code(variant(3.0))]
    for fn in shared + own:
        torch.testing.assert_close(torch.compile(fn, backend="eager")(x), fn(x))
    assert len(_debug_get_cache_entry_list(shared[0].__code__)) == 2
    assert [len(_debug_get_cache_entry_list(fn.__code__)) for fn in own] == [1, 1]


def test_bench_compiles_the_installed_module():
    """The bench's graph_moe variant is compiled as a model is: the module given to graph_moe.install is the one
    compiled, so its layout checks run around each call and Dynamo's guards do not grow with the experts (inside a
    compiled closure they had cost ~1 ms per call at 128 experts on an H200 host). Its output equals eager's."""
    import torch
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from graph_moe.tools.bench_layer import graph_moe_block
    from helpers import evaluated_guards

    guards = {}
    for experts in (4, 12):
        torch._dynamo.reset()
        cfg = Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=experts, num_experts_per_tok=2)
        block = Qwen3MoeSparseMoeBlock(cfg).requires_grad_(False)
        forward = graph_moe_block(block, inner="eager")
        x = torch.randn(1, 9, 32)
        torch.testing.assert_close(forward(x), block(x)[0])
        guards[experts] = evaluated_guards(forward.model)
    assert guards[4] > 0 and abs(guards[12] - guards[4]) <= 2, guards


def test_bench_records_name_the_commit_given_else_gits(monkeypatch):
    from graph_moe.tools.bench_record import current_commit

    monkeypatch.delenv("GRAPH_MOE_COMMIT", raising=False)
    head = current_commit()
    assert len(head) == 40 or head == "unknown"  # a checkout, or a copy without .git
    monkeypatch.setenv("GRAPH_MOE_COMMIT", "0123abc")  # named where the tree was copied: it wins over any .git
    assert current_commit() == "0123abc"
    monkeypatch.setenv("GIT_DIR", "/nonexistent")  # what a copy of the tree without .git looks like to git
    monkeypatch.delenv("GRAPH_MOE_COMMIT")
    assert current_commit() == "unknown"
