"""`edgepeft plan`: pick batch size, sequence length, LoRA rank / layers and frozen-weight quantization that fit a
target's RAM with headroom, from the memory model, and say why.

The model of one candidate's peak memory (bytes) is
    runtime fixed       measured: RSS after Trainer.open minus weights.bin, plus the inference session's delta,
                        both from one child run of the probe bundle at batch 1 on this host
  + frozen weights      weights.bin, re-costed for int8 (1 B + a 4 B scale per <=128 inputs of a row) or int4
                        (0.5 B + a 4 B scale per 32 inputs) for every frozen tensor of rank >= 2; others stay fp32;
                        quantized candidates add one fp32 copy of the largest frozen matrix (the backward
                        dequantizes one layer at a time)
  + 2 x trainable + 2 x optimizer state
                        from the manifest; LoRA tensors scaled by rank / probe rank and dropped outside the layers kept
  + activations         memory_model's peak of live values of the train-step graph at (batch, seq), linear in batch
                        (two points per seq length), turned into RSS by a line fitted to two measured runs of the
                        probe (batch 1 / seq 16 and batch 32 / seq 64): RSS growth during steps = g0 + f x planned
                        activations (f is onnxruntime's arena overhead, g0 its fixed first chunk)
  + inference           the infer graph's planned activations at (batch, seq) x f (the measurement runs predict at
                        the training batch, and every session keeps its own arena)
  + evaluation          unless evaluation=False: the eval graph's planned activations x f at the batch the loop
                        evaluates with, max(batch, 64) (device_runtime.loop)
Restricting LoRA to upper layers also shortens the backward (fewer saved activations); the model ignores that, so
it errs high. The budget is RAM x (1 - headroom). Candidates are tried best-first: no quantization before int8
before int4, longer sequences, LoRA on all layers, larger batches, then larger ranks; the first that fits wins.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import onnx

from ..errors import ConfigError
from .measure import run_child
from .memory_model import activation_bytes, spec_bytes

__all__ = ["Candidate", "MemoryModel", "plan_for_target"]

_LAYER = re.compile(r"layers\.(\d+)\.")
BATCHES = (32, 16, 8, 4, 2, 1)
SEQS = (128, 64, 32, 16)
RANKS = (16, 8, 4)
QUANTS = (None, "int8", "int4")


@dataclass(frozen=True)
class Candidate:
    batch_size: int
    seq_len: int
    rank: int
    layers: str  # "all" or "last N"
    quant: str | None


def _frozen_bytes(model: onnx.ModelProto, quant: str | None) -> tuple[int, int]:
    """(bytes of the frozen tensors stored in weights.bin under `quant`, bytes of the largest one in fp32)."""
    total = largest = 0
    for init in model.graph.initializer:
        if not init.external_data:
            continue
        n = math.prod(init.dims)
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        if quant is None or len(init.dims) < 2 or itemsize != 4:
            total += n * itemsize
            continue
        rows, inner = init.dims[0], math.prod(init.dims[1:])
        block = min(128, 1 << math.ceil(math.log2(max(inner, 16)))) if quant == "int8" else 32
        code_bytes = n if quant == "int8" else (n + 1) // 2
        total += code_bytes + 4 * rows * math.ceil(inner / block)
        largest = max(largest, 4 * n)
    return total, largest


class MemoryModel:
    """The memory model of one probe bundle, calibrated by one measurement of it on this host."""

    def __init__(self, bundle, threads: int | None = None) -> None:
        self.bundle = bundle
        self.train_model = onnx.load(str(bundle.graph_path("train_step")))
        self.other_models = {g: onnx.load(str(bundle.graph_path(g))) for g in ("infer", "eval")}
        self.seq_model = any(isinstance(d, str) and d != "batch" for s in bundle.inputs for d in s.shape)
        lora = [c for c in bundle.manifest["methods"] if c["name"] == "lora"]
        self.probe_rank = int(lora[0]["config"]["r"]) if lora else None
        self.layer_ids = sorted({int(m.group(1)) for t in bundle.trainable if (m := _LAYER.search(t.name))})
        self.structure = onnx.load(str(bundle.graph_path("train_step")), load_external_data=False)
        runs = []
        for batch, seq in ((1, 16), (32, 64)):
            options = {"batch_size": batch, "seq_len": seq, "warmup": 2, "steps": 3, "threads": threads}
            measured = run_child("measure", bundle.path, options)
            runs.append((activation_bytes(self.train_model, batch, seq)[0],
                         measured["rss_after_train"] - measured["rss_train_session"], measured))
        (act1, growth1, m), (act2, growth2, _) = runs
        self.measured = m
        weights = bundle.path / "weights.bin"
        self.probe_frozen = weights.stat().st_size if weights.is_file() else 0
        self.runtime_fixed = (m["rss_train_session"] - self.probe_frozen) + (m["rss_infer_session"]
                                                                             - m["rss_after_train"])
        self.arena_factor = max(0.0, (growth2 - growth1) / (act2 - act1)) if act2 > act1 else 1.0
        self.arena_fixed = max(0.0, growth1 - self.arena_factor * act1)
        self.calibration = [{"activations_planned": a, "rss_growth_measured": g} for a, g, _ in runs]
        self._act_cache: dict[tuple[str, int], tuple[int, int]] = {}

    def planned_activations(self, graph: str, batch_size: int, seq_len: int) -> float:
        """Planned activation bytes of `graph` at (batch, seq), linear in batch from the graph at batch 1 and 2."""
        if (graph, seq_len) not in self._act_cache:
            model = self.train_model if graph == "train_step" else self.other_models[graph]
            self._act_cache[graph, seq_len] = (activation_bytes(model, 1, seq_len)[0],
                                               activation_bytes(model, 2, seq_len)[0])
        one, two = self._act_cache[graph, seq_len]
        return one + (batch_size - 1) * max(0, two - one)

    def activations(self, batch_size: int, seq_len: int) -> float:
        """RSS for train-step activations at (batch, seq): planned bytes through the fitted arena line."""
        return self.arena_fixed + self.arena_factor * self.planned_activations("train_step", batch_size, seq_len)

    def _trainable(self, rank: int, keep_layers: set[int]) -> int:
        total = 0
        for spec in self.bundle.trainable:
            size = spec_bytes([spec])
            if ".lora_" in spec.name and self.probe_rank:
                layer = _LAYER.search(spec.name)
                if layer and int(layer.group(1)) not in keep_layers:
                    continue
                size = size * rank // self.probe_rank
            total += size
        return total

    def breakdown(self, c: Candidate, evaluation: bool = True) -> dict[str, float]:
        keep = set(self.layer_ids)
        if c.layers != "all":
            keep = set(self.layer_ids[-int(c.layers.split()[1]):])
        trainable = self._trainable(c.rank, keep)
        state_per_param = spec_bytes(self.bundle.optimizer_state) / max(1, spec_bytes(self.bundle.trainable))
        frozen, largest = _frozen_bytes(self.structure, c.quant)
        parts = {
            "runtime fixed (measured)": float(self.runtime_fixed),
            "frozen weights": float(frozen),
            "trainable x2": 2.0 * trainable,
            "optimizer state x2": 2.0 * trainable * state_per_param,
            "activations (arena fit)": self.activations(c.batch_size, c.seq_len) + largest,
            "inference activations": self.arena_factor * self.planned_activations("infer", c.batch_size, c.seq_len),
        }
        if evaluation:
            eval_batch = max(c.batch_size, 64)
            parts[f"evaluation activations (batch {eval_batch})"] = (
                self.arena_factor * self.planned_activations("eval", eval_batch, c.seq_len))
        parts["total"] = sum(parts.values())
        return parts


def _candidates(model: MemoryModel, seq_len: int | None, batch_size: int | None) -> list[Candidate]:
    seqs = [seq_len] if seq_len else (list(SEQS) if model.seq_model else [1])
    batches = [batch_size] if batch_size else list(BATCHES)
    ranks = list(RANKS) if model.probe_rank else [0]
    n = len(model.layer_ids)
    layer_options = ["all"] + ([f"last {max(1, n // 2)}"] if n > 1 else [])
    out = []
    for quant in QUANTS:
        for seq in seqs:
            for layers in layer_options:
                for batch in batches:
                    for rank in ranks:
                        out.append(Candidate(batch, seq, rank, layers, quant))
    return out


def plan_for_target(model: MemoryModel, profile: dict[str, Any], *, headroom: float = 0.5,
                    ram_bytes: int | None = None, seq_len: int | None = None,
                    batch_size: int | None = None, evaluation: bool = True) -> dict[str, Any]:
    """The first candidate (best-first order in the module docstring) whose planned peak fits the budget."""
    if not 0.0 <= headroom < 1.0:
        raise ConfigError(f"headroom must be in [0, 1), got {headroom}; 0.5 keeps half the RAM for the OS and apps")
    ram = ram_bytes or profile["ram_bytes"]
    budget = ram * (1.0 - headroom)
    tried: list[dict[str, Any]] = []
    chosen = None
    for cand in _candidates(model, seq_len, batch_size):
        parts = model.breakdown(cand, evaluation)
        fits = parts["total"] <= budget
        if len(tried) < 6 or fits:
            tried.append({"candidate": asdict(cand), "planned_bytes": parts["total"], "fits": fits})
        if fits:
            chosen = (cand, parts)
            break
    result: dict[str, Any] = {
        "target": profile["id"], "ram_bytes": ram, "headroom": headroom, "budget_bytes": budget,
        "probe": {"bundle": str(model.bundle.path), "rank": model.probe_rank, "layers": model.layer_ids,
                  "arena_factor": model.arena_factor, "arena_fixed_bytes": model.arena_fixed,
                  "calibration": model.calibration, "runtime_fixed_bytes": model.runtime_fixed,
                  "measured_on": model.measured["machine"]},
        "tried": tried,
    }
    if chosen is None:
        result.update(fits=False, why=f"nothing fits: the smallest candidate needs "
                                      f"{tried[-1]['planned_bytes'] / 2**20:.0f} MB of a {budget / 2**20:.0f} MB "
                                      "budget; lower --headroom, or use a smaller model")
        return result
    cand, parts = chosen
    rejected = [t for t in tried if not t["fits"]]
    why = [f"budget {budget / 2**20:.0f} MB = {ram / 2**20:.0f} MB RAM x (1 - headroom {headroom})",
           f"chosen needs {parts['total'] / 2**20:.1f} MB ({100 * parts['total'] / budget:.0f}% of the budget)"]
    if rejected:
        worst = rejected[0]
        w = worst["candidate"]
        why.append(f"the preferred batch {w['batch_size']} / seq {w['seq_len']} / rank {w['rank']} / {w['layers']} "
                   f"layers / {w['quant'] or 'fp32'} weights needs {worst['planned_bytes'] / 2**20:.1f} MB: over budget")
    if cand.quant:
        why.append(f"{cand.quant} frozen weights: the fp32 candidates did not fit")
    choice = asdict(cand)
    choice["layer_indices"] = (model.layer_ids if cand.layers == "all"
                               else model.layer_ids[-int(cand.layers.split()[1]):])
    result.update(fits=True, choice=choice, breakdown=parts, why=why)
    return result
