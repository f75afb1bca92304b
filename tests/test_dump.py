"""graph_moe.dump (depyf: captured and rewritten graphs side by side, an index) and the `graph_moe` log artifact."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from graph_moe.tools.dump import DumpIndex, count_calls, dump
from moe_blocks import RangeMoE
from tiny_models import build

TESTS = Path(__file__).parent
ROOT = TESTS.parent


@pytest.fixture(scope="module")
def inductor_dump(tmp_path_factory) -> DumpIndex:
    """One RangeMoE (8 experts, bf16) dumped through Inductor with the caches off: the slow part, done once."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = RangeMoE(num_experts=8, top_k=2).to(torch.bfloat16)
    return dump(module, torch.randn(2, 5, 16, dtype=torch.bfloat16), out_dir=tmp_path_factory.mktemp("dump"))


def test_dump_writes_captured_and_rewritten_graphs(inductor_dump):
    idx = inductor_dump
    (graph,) = idx.graphs
    (loop,) = idx.loops
    assert loop.rewritten and loop.num_experts == 8 and loop.top_k == 2, str(loop)

    # depyf's captured graph: the unrolled loop, one index_add_ per expert, no grouped GEMM.
    captured = count_calls(graph.captured)
    assert captured["index_add"] == 8 and captured["_grouped_mm"] == 0, captured

    # graph_moe's own file and every depyf stage after the rewrite: grouped GEMMs, (almost) no index_add.
    rewritten_text = graph.rewritten.read_text()
    for name in ("flat_expert_ids", "token_order", "expert_offsets", "token_index", "gate_proj_up_proj",
                 "torch._grouped_mm("):
        assert name in rewritten_text, name
    compile(rewritten_text, str(graph.rewritten), "exec")  # a valid Python file, as depyf's are
    stages = [graph.rewritten, graph.before_pre_grad, graph.forward, *graph.post_grad, *graph.kernels]
    assert None not in stages and graph.post_grad and graph.kernels, graph
    for path in stages:
        c = count_calls(path)
        assert c["_grouped_mm"] >= 2 and c["index_add"] <= 1, (path.name, c)
        assert path.name.startswith(graph.name + ".")  # side by side with the captured graph

    assert idx.files_to_open() == [graph.captured, graph.rewritten, graph.kernels[-1]]
    assert all(p.parent == idx.out_dir for p in idx.files_to_open())
    assert idx.function_files and all(p.exists() for p in idx.function_files)


def test_dump_index_names_loops_and_files(inductor_dump):
    idx = inductor_dump
    text = idx.index.read_text()
    (graph,) = idx.graphs
    (loop,) = idx.loops
    assert idx.index.name == "graph_moe_index.md"
    assert f"| `{graph.name}` | `{loop.block}` | 8 | 2 | gate_proj+up_proj, down_proj | rewritten |" in text
    for path in graph.files_to_open():
        assert f"`{path.name}`" in text
    assert "8 index_add, 0 _grouped_mm" in text  # the captured graph's line
    assert str(idx.index) in str(idx) and str(graph.rewritten) in str(idx)


class OneOfEach(nn.Module):
    """Two loops in one graph: `a` is rewritten, `b` is left as traced (its expert 2 has another activation)."""

    def __init__(self):
        super().__init__()
        self.a = RangeMoE(num_experts=4, top_k=2).to(torch.bfloat16)
        self.b = RangeMoE(num_experts=6, top_k=1).to(torch.bfloat16)
        self.b.experts[2].act = torch.nn.functional.gelu

    def forward(self, x):
        return self.b(self.a(x))


def test_index_names_every_loop_rewritten_or_not(tmp_path):
    torch.manual_seed(0)
    idx = dump(OneOfEach(), torch.randn(2, 3, 16, dtype=torch.bfloat16), out_dir=tmp_path, inner="eager")
    assert [(r.block, r.num_experts, r.top_k, r.rewritten) for r in idx.loops] == [
        ("a", 4, 2, True), ("b", 6, 1, False)]
    text = idx.index.read_text()
    (graph,) = idx.graphs
    assert f"| `{graph.name}` | `a` | 4 | 2 | gate_proj+up_proj, down_proj | rewritten |" in text
    assert f"| `{graph.name}` | `b` | 6 | 1 | - | left as traced: " in text and "expert 2" in text
    # The eager inner compiler writes no AOT/Inductor stages; graph_moe's own file shows the rewrite anyway.
    assert graph.forward is None and not graph.kernels
    c = count_calls(graph.rewritten)
    assert 6 <= c["index_add"] <= 7 and c["_grouped_mm"] == 2, c  # b's six index_add_ stay
    assert idx.files_to_open() == [graph.captured, graph.rewritten]


def test_dump_of_a_transformers_model_restores_it(tmp_path):
    model = build("qwen3_moe", experts=4).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    ref = model(ids, use_cache=False).logits
    idx = dump(model, ids, out_dir=tmp_path, inner="eager", use_cache=False)
    # Regional: both decoder layers share one graph; the block is named from the model's root.
    assert [(r.block, r.num_experts, r.rewritten) for r in idx.loops] == [("model.layers.*.mlp", 4, True)]
    assert "`model.layers.0`, `model.layers.1`" in idx.index.read_text()
    assert idx.install.num_installed == 2
    # Installed for the dump only, and left uncompiled.
    assert not any("forward" in m.__dict__ for m in model.modules() if hasattr(m, "experts"))
    assert all(m._compiled_call_impl is None for m in model.modules())
    torch.testing.assert_close(model(ids, use_cache=False).logits, ref)


def test_repeated_dumps_keep_compiling(tmp_path):
    """Each dump compiles afresh (new backend) and drops its cache entries: no recompile_limit after 8 dumps."""
    torch.manual_seed(0)
    module = RangeMoE(num_experts=2, top_k=1).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    with torch._dynamo.config.patch(recompile_limit=2):
        for i in range(4):
            idx = dump(module, x, out_dir=tmp_path / str(i), inner="eager")
            assert len(idx.loops) == 1, i


SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import torch, graph_moe
    from moe_blocks import RangeMoE

    class OneOfEach(torch.nn.Module):  # as in test_dump.py
        def __init__(self):
            super().__init__()
            self.a = RangeMoE(num_experts=4, top_k=2).to(torch.bfloat16)
            self.b = RangeMoE(num_experts=6, top_k=1).to(torch.bfloat16)
            self.b.experts[2].act = torch.nn.functional.gelu

        def forward(self, x):
            return self.b(self.a(x))

    def run():
        torch._dynamo.reset()
        torch.manual_seed(0)
        with graph_moe.capture_settings(), torch.no_grad():
            torch.compile(OneOfEach(), backend=graph_moe.make_backend("eager"))(
                torch.randn(2, 3, 16, dtype=torch.bfloat16))

    run()
    if sys.argv[1] == "then_set_logs":
        print("=== set_logs ===", file=sys.stderr, flush=True)
        torch._logging.set_logs(modules={{"graph_moe": True}})
        run()
    print("done")
""").format(tests=str(TESTS))


def _run(mode: str, torch_logs: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "TORCH_LOGS_OUT")}
    if torch_logs is not None:
        env["TORCH_LOGS"] = torch_logs
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-3000:]
    return proc.stderr


def _loop_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "[__graph_moe]" in line]


def test_torch_logs_graph_moe_prints_one_line_per_loop():
    """The real flow: torch parses TORCH_LOGS inside `import torch`, before graph_moe registers the artifact."""
    err = _run("once", "graph_moe")
    loops = _loop_lines(err)
    assert len(loops) == 2, err
    assert "rewrote expert loop a: 4 experts, top-2 -> grouped GEMMs [gate_proj+up_proj, down_proj]" in loops[0]
    assert "skipped expert loop b: 6 experts, top-1 -> left as traced:" in loops[1] and "expert 2" in loops[1]
    # TORCH_LOGS=graph_moe also turns on the `graph_moe` log at INFO: its one-line summary of the graph.
    assert err.count("2 expert loop(s) in this graph, 1 rewritten") == 1, err


def test_artifact_is_off_by_default_and_set_logs_enables_it():
    quiet, _, enabled = _run("then_set_logs", None).partition("=== set_logs ===")
    assert _loop_lines(quiet) == []
    # The loop left as traced still warns through the plain `graph_moe` logger.
    assert quiet.count("graph_moe left a loop as traced: b:") == 1, quiet
    assert len(_loop_lines(enabled)) == 2, enabled


def test_example_script_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("dump_graphs_example", ROOT / "examples" / "dump_graphs.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main([str(tmp_path), "--inner", "eager", "--tokens", "8"])
    out = capsys.readouterr().out
    assert "model.layers.*.mlp: 8 experts, top-2 -> grouped GEMMs" in out
    assert (tmp_path / "graph_moe_index.md").exists()
    assert "graph_moe_rewritten.py" in out and "captured by Dynamo" in out


def test_count_calls_counts_the_ops_that_stand_in_for_grouped_mm(tmp_path):
    """On CUDA the rewritten graph may call graph_moe's grouped GEMM ops instead of torch._grouped_mm (few rows per
    expert under CUDA graphs, 4-bit stacks in chunks): each counts as a grouped GEMM call; comments do not."""
    path = tmp_path / "graph.py"
    path.write_text("y = torch.ops.graph_moe.grouped_mm_few_rows.default(x, w, offs)\n"
                    "z = torch.ops.graph_moe.grouped_mm_4bit(x, p, a, offs, [4, 8, 8], 64, 'nf4', False)\n"
                    "v = torch._grouped_mm(x, w, offs=offs)\n"
                    "# torch._grouped_mm(x, w) in a comment\n"
                    "u = torch.ops.graph_moe.grouped_mm(x, w, offs)\n")
    assert count_calls(path) == {"index_add": 0, "_grouped_mm": 3, "graph_moe.grouped_mm": 1}
