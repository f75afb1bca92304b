"""User tooling around the API: the `graph-moe` command line (tools/cli.py), its benchmarks (`graph-moe bench`:
bench_layer, bench_compile, bench_step, bench_memory; bench_record writes what every record holds), the demo, the
depyf dump behind `graph_moe.dump`, and MoE models built from configs (model_zoo)."""
