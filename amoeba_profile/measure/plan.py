"""What a build measures, by method.

- ``components``: attn and mlp blocks alone for every width of the grid, plus ``base`` (the model
  with no decoder layers) through the serving loop.
- ``difference``: whole models of at least three depths through the serving loop for every layer
  shape to fit, plus the model with no decoder layers (where the flow can serve it: it pins the
  base). Shapes lie on two axes through the full width: each width's heads at full FFN, and each
  width's FFN at full heads. A layer whose heads and FFN are both narrowed is composed additively
  from the axes; the interaction that misses is measured by validation models.
- ``calibrated``: the ``components`` rows, plus a few whole models through the serving loop
  (``calibration_subnets``: three engines, whatever the grid) that correct the components' bias:
  a component timed alone misses what the serving loop adds per layer (dispatch, cache updates,
  cache misses between blocks), so per (phase, prompt length or context) the fit
  y - base = a * sum(components) + d * layers rescales the composed cost and adds a per-layer
  cost (``fit.calibrate_rows``). Two coefficients need only a few engines, where the
  ``difference`` method needs three depths of every layer shape.
All add the ``whole`` subnets (truth rows) measured through the serving loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from amoeba_profile.core.arch import ModelArch
from amoeba_profile.core.entry import Entry
from amoeba_profile.core.errors import UsageError
from amoeba_profile.core.inputs import positive_int
from amoeba_profile.core.schema import Grid
from amoeba_profile.core.subnet import AMOEBA_WIDTHS, DEFAULT_DROP_RULE, LayerShape, Subnet, grid_shapes, kept_layers

METHODS = ("components", "calibrated", "difference")
MIN_DEPTHS = 3
ZERO_LAYERS = ""  # subnet id of a model row with no decoder layers


def spread_depths(arch: ModelArch, count: int = MIN_DEPTHS) -> tuple[int, ...]:
    """``count`` depths from about an eighth of the model to all of it.

    The fitted per-layer cost is a slope: its error is the timing noise divided by the depth span,
    so a wide span beats depths clustered where the picker looks (measured on the 2-core CPU: depths
    14/18/22 of TinyLlama left the base indeterminate under ~10 % noise). A shallow model is also
    cheap to measure, and the middle depth exposes any curvature in the residuals."""
    low, high = max(1, round(arch.num_layers / 8)), arch.num_layers
    if high - low + 1 < count:
        low = max(1, high - count + 1)
    return tuple(sorted({round(low + i * (high - low) / (count - 1)) for i in range(count)}))


@dataclass(frozen=True)
class BuildPlan:
    arch: ModelArch
    widths: tuple[float, ...] = AMOEBA_WIDTHS
    prompt_lens: tuple[int, ...] = (128,)
    contexts: tuple[int, ...] = (128, 256, 512)
    batch: int = 1
    drop_rule: str = DEFAULT_DROP_RULE
    ffn_multiple: int = 1
    whole: tuple[Subnet, ...] = field(default=())
    method: str = "components"
    depths: tuple[int, ...] = ()  # difference: default spread_depths(arch)
    decode_steps: int = 8  # decode steps per serving-loop tpot sample (the window centred on a context)
    measure_grid: bool = True  # False: only the whole subnets (validation runs)
    extra_attn: tuple[tuple[int, int], ...] = ()  # per-layer widths a strategy file adds to the grid
    extra_ffn: tuple[int, ...] = ()
    # The config.json the arch was read from (None for a built-in name): recorded in the table's
    # sidecar for --export, which carries the fields no latency depends on; not part of what is measured.
    source_config: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        positive_int(self.batch, "batch")
        positive_int(self.decode_steps, "decode steps")
        for what, values in (("prompt lengths", self.prompt_lens), ("contexts", self.contexts)):
            if not values:
                raise UsageError(f"{what} must not be empty")
            for value in values:
                positive_int(value, what)
            over = [v for v in values if v > self.arch.max_position]
            if over:
                raise UsageError(
                    f"{what} {over} are above {self.arch.name}'s max_position_embeddings {self.arch.max_position}"
                )
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}: use one of {list(METHODS)}")
        if self.method == "difference" and self.measure_grid and len(set(self.fit_depths())) < MIN_DEPTHS:
            raise UsageError(f"the difference method needs at least {MIN_DEPTHS} depths, got {list(self.fit_depths())}")
        bad = [d for d in self.fit_depths() if not 1 <= d <= self.arch.num_layers]
        if bad:
            raise UsageError(f"depths {bad} outside 1..{self.arch.num_layers}")
        small = [c for c in self.contexts if c < self.decode_steps // 2]
        if small:
            raise UsageError(f"contexts {small} are shorter than half the decode window ({self.decode_steps} steps)")

    def check_usable(self) -> None:
        """Refuse a grid no request can be predicted from, before anything is measured or computed.

        A request's decode steps start with its prompt in the KV cache: after a P-token prompt the
        first step runs at context P (``Workload.decode_span``), and the predictor interpolates
        decode rows only inside the measured contexts (for ttft too: every prediction composes
        the request's decode steps). So a prompt length outside [min(contexts), max(contexts)]
        gives rows no request of that prompt can use."""
        low, high = min(self.contexts), max(self.contexts)
        outside = sorted(p for p in set(self.prompt_lens) if not low <= p <= high)
        if outside:
            fix = " and ".join(
                ([f"a context of {outside[0]} or less"] if outside[0] < low else [])
                + ([f"one of {outside[-1]} or more"] if outside[-1] > high else [])
            )
            fix = f"add {fix} to --contexts"
            raise UsageError(
                f"--prompt-len {','.join(map(str, outside))}: outside the decode contexts [{low}, "
                f"{high}]; a request's first decode step runs at context = its prompt length, so no "
                f"request with that prompt could be predicted from this table; {fix}"
            )

    def fit_depths(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.depths))) if self.depths else spread_depths(self.arch)

    def _grid_shapes(self) -> tuple[list[tuple[int, int]], list[int], list[tuple[int, int, int]]]:
        return grid_shapes(self.arch, self.widths, self.ffn_multiple, self.extra_attn, self.extra_ffn)

    def attn_shapes(self) -> list[tuple[int, int]]:
        return self._grid_shapes()[0]

    def ffn_sizes(self) -> list[int]:
        return self._grid_shapes()[1]

    def layer_shapes(self) -> list[tuple[int, int, int]]:
        """Shapes the difference method fits: the heads axis at full FFN, the FFN axis at full heads."""
        return self._grid_shapes()[2]

    def fit_subnets(self) -> list[Subnet]:
        """One model per (shape, depth): ``depth`` layers all of that shape."""
        out = []
        for heads, kv, ffn in self.layer_shapes():
            for depth in self.fit_depths():
                layers = tuple(LayerShape(i, heads, kv, ffn) for i in kept_layers(self.arch, depth, self.drop_rule))
                out.append(Subnet(self.arch, layers))
        return out

    def fit_ids(self) -> set[str]:
        """Subnet ids of the models a fit reads: the difference fit's (``ZERO_LAYERS`` is the model
        without layers) or the calibration's; empty for a components table."""
        if not self.measure_grid or self.method == "components":
            return set()
        if self.method == "calibrated":
            return {s.id for s in self.calibration_subnets()}
        return {s.id for s in self.fit_subnets()} | {ZERO_LAYERS}

    def calibration_subnets(self) -> list[Subnet]:
        """The calibrated method's whole models, chosen so that the two coefficients of every group
        are well apart: the full model (the anchor every budget is compared against), half the
        layers at the narrowest heads and FFN (the lowest component cost per layer), and half the
        layers alternating narrow heads at full FFN with full heads at narrow FFN (the middle,
        and a check that the two axes add)."""
        a = self.arch
        narrow_h, narrow_kv = min(self.attn_shapes())
        narrow_f = min(self.ffn_sizes())
        half = max(1, a.num_layers // 2)

        def model(depth: int, shapes: list[tuple[int, int, int]]) -> Subnet:
            kept = kept_layers(a, depth, self.drop_rule)
            return Subnet(a, tuple(LayerShape(i, *shape) for i, shape in zip(kept, shapes)))

        alternating = [
            (narrow_h, narrow_kv, a.ffn_size) if i % 2 == 0 else (a.num_heads, a.num_kv_heads, narrow_f)
            for i in range(half)
        ]
        narrowest = min(self.widths)
        subnets = [
            Subnet.uniform(a, a.num_layers, 1.0, drop_rule=self.drop_rule, ffn_multiple=self.ffn_multiple),
            Subnet.uniform(a, half, narrowest, drop_rule=self.drop_rule, ffn_multiple=self.ffn_multiple),
            model(half, alternating),
        ]
        unique = {s.id: s for s in subnets}
        return list(unique.values())

    def _serving(self, component: str, subnet: Subnet | None) -> list[Entry]:
        b = self.batch
        return [Entry(component, "prefill", b, p, 0, subnet=subnet) for p in self.prompt_lens] + [
            Entry(component, "decode", b, 1, c, subnet=subnet) for c in self.contexts
        ]

    def entries(self) -> list[Entry]:
        out: list[Entry] = []
        seen: set[str] = set()
        for subnet in self.whole:
            if subnet.id not in seen:
                seen.add(subnet.id)
                out += self._serving("model", subnet)
        if not self.measure_grid:
            return out
        if self.method == "difference":
            out += self._serving("model", None)  # the 0-layer model: subnet id ZERO_LAYERS
            for subnet in self.fit_subnets():
                if subnet.id not in seen:
                    seen.add(subnet.id)
                    out += self._serving("model", subnet)
            return out
        if self.method == "calibrated":
            for subnet in self.calibration_subnets():
                if subnet.id not in seen:
                    seen.add(subnet.id)
                    out += self._serving("model", subnet)
        b = self.batch
        out += self._serving("base", None)
        for heads, kv in self.attn_shapes():
            out += [Entry("attn", "prefill", b, p, 0, heads, kv) for p in self.prompt_lens]
            out += [Entry("attn", "decode", b, 1, c, heads, kv) for c in self.contexts]
        for ffn in self.ffn_sizes():
            out += [Entry("mlp", "prefill", b, p, 0, ffn=ffn) for p in self.prompt_lens]
            out.append(Entry("mlp", "decode", b, 1, 0, ffn=ffn))
        return out

    def engine_limits(self) -> tuple[int, int, int]:
        """(max batch, max input length, max sequence length) every engine of this plan must serve."""
        longest_prompt = max(self.prompt_lens)
        longest_context = max(self.contexts) + self.decode_steps
        return self.batch, max(longest_prompt, longest_context), max(longest_prompt, longest_context) + 2

    def grid(self) -> Grid:
        return Grid(
            widths=list(self.widths),
            prompt_lens=list(self.prompt_lens),
            contexts=list(self.contexts),
            batch=self.batch,
            drop_rule=self.drop_rule,
            ffn_multiple=self.ffn_multiple,
            method=self.method,
            depths=list(self.fit_depths()) if self.method == "difference" else [],
            decode_steps=self.decode_steps,
            measure_grid=self.measure_grid,
            extra_attn=[list(x) for x in self.extra_attn],
            extra_ffn=list(self.extra_ffn),
        )
