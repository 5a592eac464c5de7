"""``memory_report``: where an llmint8 model's bytes are."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from ..nn import Int8Linear


@dataclass
class MemoryReport:
    """Bytes held by a model, split by kind. ``total`` equals ``model.get_memory_footprint()``."""

    int8_weights: int
    scales: int
    int8_layer_biases: int
    float_layers: int
    other_buffers: int
    total: int
    num_int8_layers: int
    float_linear_layers: list[str]

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        mb = 1024**2
        rows = [
            ("int8 weights", self.int8_weights),
            ("fp32 scales", self.scales),
            ("biases of int8 layers", self.int8_layer_biases),
            ("floating-point layers", self.float_layers),
            ("other buffers", self.other_buffers),
            ("total", self.total),
        ]
        lines = [f"{label:<24}{size:>14,d} B {size / mb:>10.2f} MiB" for label, size in rows]
        lines.append(
            f"{self.num_int8_layers} int8 layers; linear layers left in floating point: "
            f"{', '.join(self.float_linear_layers) or 'none'}"
        )
        return "\n".join(lines)


def _nbytes(t) -> int:
    return t.nelement() * t.element_size()


def memory_report(model: nn.Module) -> MemoryReport:
    """Break ``model``'s memory down into int8 weights, scales, biases, floating-point layers and other buffers."""
    int8_weights = scales = biases = 0
    counted: set[int] = set()
    num_int8 = 0
    for module in model.modules():
        if isinstance(module, Int8Linear):
            num_int8 += 1
            int8_weights += _nbytes(module.weight)
            scales += _nbytes(module.weight_scale)
            counted.update({id(module.weight), id(module.weight_scale)})
            if module.bias is not None:
                biases += _nbytes(module.bias)
                counted.add(id(module.bias))
    float_params = sum(_nbytes(p) for p in model.parameters() if id(p) not in counted)
    other_buffers = sum(_nbytes(b) for b in model.buffers() if id(b) not in counted)
    float_linears = [
        name for name, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
    ]
    total = int8_weights + scales + biases + float_params + other_buffers
    return MemoryReport(int8_weights, scales, biases, float_params, other_buffers, total, num_int8, float_linears)
