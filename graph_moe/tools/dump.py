"""`graph_moe.dump`: a depyf dump of the graphs Dynamo captured and of the same graphs after graph_moe's rewrite.

    index = graph_moe.dump(model, input_ids, out_dir="moe_dump")
    print(index)        # the loops, and the files to open: captured graph, rewritten graph, Inductor kernel

depyf writes what Dynamo captured (`__compiled_fn_<n>.__compiled_fn_<n>_<uuid>.0.py`: the E unrolled expert
bodies, one `index_add_` each) and, because the inner compiler is AOTAutograd/Inductor and the caches are off,
what Inductor received and made of it (`BEFORE_PRE_GRAD`, `Forward_graph`, `AFTER_POST_GRAD`, `kernel_<i>`).
graph_moe writes the rewritten graph itself (`__compiled_fn_<n>.graph_moe_rewritten.py`: `flat_expert_ids`,
`token_order`, `expert_offsets`, `torch._grouped_mm`, ...) so it sits next to the captured one whatever the
inner compiler, and `graph_moe_index.md` names each loop and the files to open.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch._dynamo.eval_frame import _debug_get_cache_entry_list, reset_code

from graph_moe.backend import make_backend, run_inner
from graph_moe.compile import capture_settings, decoder_layers
from graph_moe.install import InstallReport, install, uninstall
from graph_moe.report import LoopReport

INDEX_NAME = "graph_moe_index.md"
REWRITTEN_SUFFIX = "graph_moe_rewritten"
_PRELUDE = "from __future__ import annotations\nimport torch\nfrom torch import device\n"  # as depyf writes graphs
_OURS = ("__compiled_fn_", "full_code_for_", "__transformed_code_", INDEX_NAME)  # what a dump writes
_FN_RE = re.compile(r"^(__compiled_fn_\d+)")
_INDEX_ADD = re.compile(r"\bindex_add_?(\.default)?\(")
# torch._grouped_mm, and graph_moe's ops that stand in for it on CUDA (few rows per expert; 4-bit stacks in chunks)
_GROUPED = re.compile(r"\b(_grouped_mm|graph_moe\.grouped_mm_few_rows|graph_moe\.grouped_mm_4bit)(\.default)?\(")
_FALLBACK = re.compile(r"\bgraph_moe\.grouped_mm(\.default)?\(")  # the custom op for non-bf16 loops


def count_calls(path: str | Path) -> dict[str, int]:
    """Calls to index_add(_), torch._grouped_mm (or the graph_moe ops that stand in for it on CUDA) and graph_moe's
    grouped_mm custom op (used where the loop is not bfloat16) in a dumped file; comment lines are skipped."""
    counts = {"index_add": 0, "_grouped_mm": 0, "graph_moe.grouped_mm": 0}
    for line in Path(path).read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        counts["index_add"] += len(_INDEX_ADD.findall(line))
        counts["_grouped_mm"] += len(_GROUPED.findall(line))
        counts["graph_moe.grouped_mm"] += len(_FALLBACK.findall(line))
    return counts


@dataclasses.dataclass
class GraphDump:
    """One graph Dynamo handed to the backend, and the files written for it."""

    name: str  # "__compiled_fn_<n>", the prefix of all its files
    loops: list[LoopReport]
    rewritten: Path  # graph_moe's rewritten graph (gm.print_readable)
    captured: Path | None = None  # depyf: the graph as Dynamo captured it, before the rewrite
    before_pre_grad: Path | None = None  # depyf: what Inductor received (the rewritten graph again)
    forward: Path | None = None  # depyf: AOTAutograd's forward graph (aten ops)
    post_grad: list[Path] = dataclasses.field(default_factory=list)  # depyf: after Inductor's post-grad passes
    kernels: list[Path] = dataclasses.field(default_factory=list)  # depyf: Inductor's output code
    other: list[Path] = dataclasses.field(default_factory=list)

    def files_to_open(self) -> list[Path]:
        """Captured graph, rewritten graph, and the last stage that was written (kernel, post-grad or forward)."""
        last = (self.kernels or self.post_grad or ([self.forward] if self.forward else []))[-1:]
        return [p for p in (self.captured, self.rewritten, *last) if p is not None]


@dataclasses.dataclass
class DumpIndex:
    out_dir: Path
    index: Path  # graph_moe_index.md
    graphs: list[GraphDump]
    install: InstallReport
    function_files: list[Path]  # depyf's full_code_for_* and __transformed_code_* (guards, transformed bytecode)
    inner: str
    seconds: float

    @property
    def loops(self) -> list[LoopReport]:
        return [r for g in self.graphs for r in g.loops]

    @property
    def rewritten(self) -> int:
        return sum(r.rewritten for r in self.loops)

    def files_to_open(self) -> list[Path]:
        """The three files to open first: captured graph, rewritten graph, Inductor kernel of the first graph
        holding a loop (or of the first graph)."""
        with_loops = [g for g in self.graphs if g.loops] or self.graphs
        return with_loops[0].files_to_open() if with_loops else []

    def __str__(self) -> str:
        lines = [f"graph_moe dump in {self.out_dir} ({len(self.graphs)} graph(s), {len(self.loops)} expert loop(s), "
                 f"{self.rewritten} rewritten; inner compiler {self.inner}, {self.seconds:.1f} s)"]
        lines += [f"  {g.name}: {r}" for g in self.graphs for r in g.loops]
        lines.append(f"index: {self.index}")
        lines += ["open:"] + [f"  {p}" for p in self.files_to_open()]
        return "\n".join(lines)


def _graph_name(gm: torch.fx.GraphModule) -> str:
    """The `__compiled_fn_<n>` depyf names this graph's files after."""
    m = _FN_RE.match(str(getattr(gm, "meta", {}).get("backend_id", "")))
    if m:
        return m.group(1)
    from depyf.explain.utils import get_current_compiled_fn_name  # the counter depyf itself reads

    return get_current_compiled_fn_name()


def _unique(path: Path) -> Path:
    stem, k = path.name[: -len(".py")], 1
    while path.exists():
        path = path.with_name(f"{stem}.{k}.py")
        k += 1
    return path


# The compiled layer itself, where the pass's block name still carries it ("args.0.mlp", "L['args[0].mlp");
# recent versions of the pass name the block relative to the layer ("mlp").
_REGION_ROOT = re.compile(r"^(args\.0(\.|$)|L\['args'?\]?\[0\]\.?)")


def _natural(name: str):
    """Sort key: model.layers.2 before model.layers.10."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in name.split(".")]


def _region_pattern(region_names: list[str]) -> str:
    """"model.layers.*" for model.layers.0 .. model.layers.N, else the names joined with "|"."""
    prefixes = {n.rsplit(".", 1)[0] for n in region_names if n.rsplit(".", 1)[-1].isdigit()}
    if len(prefixes) == 1 and all(n.rsplit(".", 1)[-1].isdigit() for n in region_names):
        return f"{prefixes.pop()}.*"
    return "|".join(region_names)


def _display_block(block: str, region_names: list[str]) -> str:
    """A loop's block named from the model's root. In a regional dump every graph is one decoder layer (shared
    by identical layers), so the pass's layer-relative name ("mlp") gets the layers in front."""
    if not region_names:
        return block
    rest = _REGION_ROOT.sub("", block)
    pattern = _region_pattern(region_names)
    return f"{pattern}.{rest}" if rest and rest != "self" else pattern


def _classify(out_dir: Path, files: list[Path], graphs: dict[str, GraphDump]) -> list[Path]:
    """Attach depyf's files to their graphs; return the per-function files."""
    function_files = []
    for path in sorted(files):
        name = path.name
        m = _FN_RE.match(name)
        g = graphs.get(m.group(1)) if m else None
        if g is None:
            if name.startswith(("full_code_for_", "__transformed_code_")):
                function_files.append(path)
            continue
        stage = name[len(g.name) + 1:]
        if path == g.rewritten:
            continue
        if stage.startswith(g.name + "_"):  # __compiled_fn_1.__compiled_fn_1_<uuid>.0.py
            g.captured = g.captured or path
        elif stage.startswith("BEFORE_PRE_GRAD"):
            g.before_pre_grad = path
        elif stage.startswith("Forward_graph"):
            g.forward = path
        elif stage.startswith("AFTER_POST_GRAD"):
            g.post_grad.append(path)
        elif stage.startswith("kernel_"):
            g.kernels.append(path)
        else:
            g.other.append(path)
    return function_files


def _rel(path: Path | None, out_dir: Path) -> str:
    return f"`{path.relative_to(out_dir)}`" if path is not None else "(not written)"


def _write_index(idx: DumpIndex, model_name: str, regions: list[str]) -> None:
    out = idx.out_dir
    lines = [
        "# graph_moe dump",
        "",
        f"Model `{model_name}`, torch {torch.__version__}, inner compiler `{idx.inner}`, caches off, "
        f"{idx.seconds:.1f} s. {len(idx.graphs)} graph(s), {len(idx.loops)} expert loop(s), "
        f"{idx.rewritten} rewritten into grouped GEMMs.",
        "",
        "Compiled regions: " + (", ".join(f"`{r}`" for r in regions) if regions else "the whole model") + ".",
        "",
        "## Expert loops",
        "",
        "| graph | block | experts | top-k | projections | result |",
        "|---|---|---|---|---|---|",
    ]
    for g in idx.graphs:
        for r in g.loops:
            result = "rewritten" if r.rewritten else f"left as traced: {r.reason}"
            lines.append(f"| `{g.name}` | `{r.block}` | {r.num_experts} | {r.top_k} | "
                         f"{', '.join(r.projections) or '-'} | {result.replace('|', '/')} |")
    if not idx.loops:
        lines.append("| - | - | - | - | - | no graph held an unrolled expert loop |")
    lines += ["", "## Files to open", ""]
    for g in idx.graphs:
        lines.append(f"### `{g.name}` ({len(g.loops)} loop(s))")
        lines.append("")
        stages = [
            ("as Dynamo captured it, before the rewrite (one `index_add_` per expert)", g.captured),
            ("after graph_moe's rewrite (`flat_expert_ids`, `token_order`, `expert_offsets`, "
             "`torch._grouped_mm`)", g.rewritten),
            ("what Inductor received (the rewritten graph)", g.before_pre_grad),
            ("AOTAutograd's forward graph (aten ops)", g.forward),
        ]
        stages += [("after Inductor's post-grad passes", p) for p in g.post_grad]
        stages += [("Inductor's output code", p) for p in g.kernels]
        for what, path in stages:
            if path is None:
                continue
            c = count_calls(path)
            fallback = f", {c['graph_moe.grouped_mm']} graph_moe.grouped_mm" if c["graph_moe.grouped_mm"] else ""
            lines.append(f"- {_rel(path, out)}: {what}; {c['index_add']} index_add, "
                         f"{c['_grouped_mm']} _grouped_mm{fallback} call(s)")
        lines.append("")
    if idx.function_files:
        lines += ["### Per compiled function (guards, transformed bytecode)", ""]
        lines += [f"- {_rel(p, out)}" for p in idx.function_files] + [""]
    lines += ["## MoE blocks", "", "```", str(idx.install), "```", ""]
    idx.index.write_text("\n".join(lines))


def dump(model: nn.Module, *example_inputs, out_dir: str | Path, inner: str | Callable = "inductor",
         regional: bool = True, fuse_projections: bool = True, clean: bool = True, **example_kwargs) -> DumpIndex:
    """Compile `model` with graph_moe under depyf, run the example inputs once (no gradients), and write the
    captured and rewritten graphs side by side in `out_dir`, with `graph_moe_index.md`.

    inner: the compiler after the rewrite. "inductor" (default) makes depyf also write the AOTAutograd and
        Inductor stages and the kernels; "aot_eager" writes the forward graph; "eager" only the two graphs.
    regional: compile each decoder layer holding an MoE block on its own, as graph_moe.compile does (identical
        layers share one graph), or the whole model as one region.
    clean: first remove the files of an earlier dump from out_dir (depyf's `__compiled_fn_*`, `full_code_for_*`,
        `__transformed_code_*` and the index); other files are left alone.
    Blocks not yet installed are installed for the dump and restored afterwards. The model is left uncompiled.
    """
    import depyf

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if clean:
        for p in out_dir.iterdir():
            if p.is_file() and p.name.startswith(_OURS):
                p.unlink()
    before = {p: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    installed_before = {id(m) for m in model.modules() if getattr(m, "_graph_moe_installed", None)}
    report = install(model)

    graphs: dict[str, GraphDump] = {}
    pending: list[LoopReport] = []
    inner_name = inner if isinstance(inner, str) else getattr(inner, "__name__", "callable")

    def keep_and_compile(gm, example_inputs_, **kwargs):
        name = _graph_name(gm)
        path = _unique(out_dir / f"{name}.{REWRITTEN_SUFFIX}.py")
        loops = list(pending)
        pending.clear()
        captured = sorted(out_dir.glob(f"{name}.{name}_*.py"))  # depyf writes it before the backend runs
        head = [f"# {name} after graph_moe's rewrite, as handed to the inner compiler ({inner_name}).",
                f"# The graph as Dynamo captured it: {captured[0].name if captured else '(not written)'}"]
        head += [f"#   {r}" for r in loops] or ["#   no expert loop in this graph"]
        path.write_text("\n".join(head) + "\n" + _PRELUDE + gm.print_readable(print_output=False))
        graphs.setdefault(name, GraphDump(name, loops, path))
        return run_inner(inner, gm, example_inputs_, mode=kwargs.get("mode"), options=kwargs.get("options"))

    backend = make_backend(keep_and_compile, fuse_projections=fuse_projections, on_reports=pending.extend)
    regions = decoder_layers(model, report) if regional else []
    modules = {id(m): n for n, m in model.named_modules()}
    start = time.perf_counter()
    fresh_codes: dict = {}  # code objects Dynamo compiled here -> how many cache entries they had before

    def note_code(code, new_code):
        fresh_codes.setdefault(code, len(_debug_get_cache_entry_list(code)))  # returns None: keep Dynamo's code

    hook = torch._dynamo.convert_frame.register_bytecode_hook(note_code)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message=r".*You are trying to debug `torch.compile`")
            warnings.filterwarnings("ignore", message=r".*dynamo_pgo force disabled")
            stack.enter_context(torch.compiler.config.patch(force_disable_caches=True))
            stack.enter_context(capture_settings())
            stack.enter_context(depyf.prepare_debug(str(out_dir)))
            stack.enter_context(torch.no_grad())
            if regions:
                saved = [r._compiled_call_impl for r in regions]  # a graph_moe.compile'd model keeps its own
                for region in regions:
                    region._compiled_call_impl = torch.compile(region._call_impl, backend=backend)
                try:
                    model(*example_inputs, **example_kwargs)
                finally:
                    for region, old in zip(regions, saved):
                        region._compiled_call_impl = old
            else:
                torch.compile(model, backend=backend)(*example_inputs, **example_kwargs)
    finally:
        hook.remove()
        # Drop what this dump compiled, where nothing else had compiled that code: every dump builds a new
        # backend (it must recompile to write its files), and otherwise the entries pile up on shared code
        # (a decoder layer's forward) until Dynamo's recompile_limit (8) stops compiling it.
        for code, entries_before in fresh_codes.items():
            if entries_before == 0:
                reset_code(code)
        for m in model.modules():
            if id(m) not in installed_before and getattr(m, "_graph_moe_installed", None):
                uninstall(m)
    seconds = time.perf_counter() - start

    region_names = sorted({modules[id(r)] for r in regions}, key=_natural)
    for g in graphs.values():
        g.loops = [dataclasses.replace(r, block=_display_block(r.block, region_names)) for r in g.loops]
    written = [p for p in out_dir.iterdir() if p.is_file() and before.get(p) != p.stat().st_mtime_ns]
    function_files = _classify(out_dir, written, graphs)
    idx = DumpIndex(out_dir, out_dir / INDEX_NAME, list(graphs.values()), report, function_files, inner_name,
                    seconds)
    _write_index(idx, type(model).__name__, region_names)
    return idx


def dump_config(config_name_or_path: str, out_dir: str | Path, tokens: int = 64, *, batch: int = 1,
                inner: str | Callable = "inductor", regional: bool = True, seed: int = 0, **sizes) -> DumpIndex:
    """Dump a small model built from a transformers config with random bf16 weights.

    config_name_or_path: a family ("qwen3_moe", "olmoe", "mixtral", "qwen2_moe"), mapped to a tiny config, or a
        path to a config.json (its sizes are used as they are: pick a small one).
    sizes: layers, experts, top_k, hidden, intermediate, vocab (see graph_moe.tools.model_zoo.make_config).
    """
    from graph_moe.tools.model_zoo import build_model

    model = build_model(config_name_or_path, dtype=torch.bfloat16, seed=seed, **sizes).eval()
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=gen)
    return dump(model, input_ids, out_dir=out_dir, inner=inner, regional=regional, use_cache=False)


__all__ = ["dump", "dump_config", "DumpIndex", "GraphDump", "count_calls"]
