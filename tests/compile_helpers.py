"""Helpers for the torch.compile tests: LiME training steps through a whole-model compile, every graph
recorded."""

from typing import List, Tuple

import torch
from torch._dynamo.testing import AotEagerAndRecordGraphs

import lime
from lime_kernels.accounting import graph_host_syncs


def compiled_training_steps(model: torch.nn.Module, batch: dict, steps: int = 3
                            ) -> Tuple[AotEagerAndRecordGraphs, List[torch.Tensor]]:
    """`steps` training steps of `model` on `batch` (the model's loss plus LiME's balance loss, backward, an
    SGD step) through `torch.compile(model, fullgraph=True)` and a `fullgraph` compile of
    `lime.compute_balance_loss`, as a training loop calls them: a graph break raises with its reason, and a
    recompile raises too (`error_on_recompile`). Returns the recorder (`.graphs` as Dynamo traced them,
    `.fw_graphs` / `.bw_graphs` as AOTAutograd split them) and the losses."""
    torch._dynamo.reset()  # code compiled for an earlier model of the same class would be recompiled, not reused
    record = AotEagerAndRecordGraphs()
    compiled = torch.compile(model, backend=record, fullgraph=True)
    balance = torch.compile(lime.compute_balance_loss, backend=record, fullgraph=True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    losses = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(steps):
            loss = compiled(**batch).loss + balance(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
    return record, losses


def recorded_host_syncs(record: AotEagerAndRecordGraphs) -> List[str]:
    """The sync-prone operators (`lime_kernels.accounting.SYNC_OPS`) of every forward and backward graph."""
    return [name for graph in record.fw_graphs + record.bw_graphs for name in graph_host_syncs(graph)]


def recording_compile_config():
    """transformers' CompileConfig for generate(cache_implementation="static") with a backend that records each
    graph it is handed (the returned list) and runs it as traced; fullgraph, and compiled on any device
    (`_compile_all_devices`: transformers compiles on a GPU only unless told)."""
    from transformers import CompileConfig

    graphs = []

    def backend(graph, example_inputs):  # a function: CompileConfig deep-copies its backend
        graphs.append(graph)
        return graph.forward

    config = CompileConfig(backend=backend, fullgraph=True, mode=None)
    config._compile_all_devices = True
    return config, graphs
