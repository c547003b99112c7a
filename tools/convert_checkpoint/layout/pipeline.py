"""Pipeline (and virtual pipeline) layer assignment, model-agnostic."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConversionError


@dataclass(frozen=True)
class PipelineLayout:
    """Layers per *virtual* stage, in virtual-stage order (length ``pp * vpp``).

    Virtual stage ``s * pp + p`` is model chunk ``s`` of pipeline rank ``p`` (Megatron's
    interleaved schedule), so chunk ``s`` of rank ``p`` holds the layers after all earlier
    virtual stages.
    """

    pp: int
    vpp: int
    layers_per_vstage: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return sum(self.layers_per_vstage)

    def vstage(self, pp_rank: int, chunk: int) -> int:
        return chunk * self.pp + pp_rank

    def rank_and_chunk(self, vstage: int) -> tuple[int, int]:
        return vstage % self.pp, vstage // self.pp

    def first_layer(self, vstage: int) -> int:
        return sum(self.layers_per_vstage[:vstage])

    def locate(self, layer: int) -> tuple[int, int, int]:
        """(pipeline rank, chunk, local layer index) of a global decoder layer."""
        start = 0
        for vstage, count in enumerate(self.layers_per_vstage):
            if layer < start + count:
                rank, chunk = self.rank_and_chunk(vstage)
                return rank, chunk, layer - start
            start += count
        raise ValueError(f"layer {layer} beyond {self.num_layers} layers")

    def container(self, chunk: int) -> str:
        """Top-level key of a rank file: ``model`` without VPP, ``model{chunk}`` with it."""
        return "model" if self.vpp == 1 else f"model{chunk}"

    @property
    def last_vstage(self) -> int:
        return self.pp * self.vpp - 1


def balanced_split(num_layers: int, stages: int) -> tuple[int, ...]:
    """Even split; the first ``num_layers % stages`` virtual stages take one layer more."""
    base, extra = divmod(num_layers, stages)
    return tuple(base + (1 if s < extra else 0) for s in range(stages))


def parse_layer_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.replace(" ", "").split(",") if x != "")
    except ValueError:
        raise ConversionError(f"--custom_pipeline_layers {text!r}: expected comma-separated integers like 8,7,8") from None
    if not values:
        raise ConversionError(f"--custom_pipeline_layers {text!r}: empty list")
    return values


def build_pipeline_layout(
    num_layers: int,
    pp: int,
    vpp: int | None,
    custom: tuple[int, ...] | None,
    layers_per_vstage_flag: int | None = None,
) -> PipelineLayout:
    """``vpp`` None means "not given": 1, or implied by ``layers_per_vstage_flag``."""
    if vpp is None:
        vpp = 1
        if layers_per_vstage_flag is not None:
            if num_layers % (pp * layers_per_vstage_flag):
                raise ConversionError(
                    f"--num_layers_per_virtual_pipeline_stage {layers_per_vstage_flag} x pipeline size {pp} "
                    f"does not divide {num_layers} layers"
                )
            vpp = num_layers // (pp * layers_per_vstage_flag)
    if pp < 1 or vpp < 1:
        raise ConversionError("--pipeline_model_parallel_size and --num-virtual-stages-per-pipeline-rank must be >= 1")
    if vpp > 1 and pp == 1:
        raise ConversionError("--num-virtual-stages-per-pipeline-rank > 1 needs --pipeline_model_parallel_size > 1")
    stages = pp * vpp
    if custom is not None:
        if len(custom) != stages:
            raise ConversionError(
                f"--custom_pipeline_layers has {len(custom)} entries, expected one per virtual stage: "
                f"pipeline size {pp} x virtual stages {vpp} = {stages}"
            )
        if any(c < 0 for c in custom):
            raise ConversionError(f"--custom_pipeline_layers {','.join(map(str, custom))}: negative layer count")
        if sum(custom) != num_layers:
            raise ConversionError(
                f"--custom_pipeline_layers {','.join(map(str, custom))} sums to {sum(custom)}, but the model has {num_layers} layers"
            )
        counts = custom
    elif layers_per_vstage_flag is not None:
        if layers_per_vstage_flag * stages != num_layers:
            raise ConversionError(
                f"--num_layers_per_virtual_pipeline_stage {layers_per_vstage_flag} x {stages} virtual stages != {num_layers} layers"
            )
        counts = (layers_per_vstage_flag,) * stages
    else:
        counts = balanced_split(num_layers, stages)
    if any(c == 0 for c in counts):
        raise ConversionError(
            f"pipeline layout {','.join(map(str, counts))} leaves a virtual stage without layers "
            f"({num_layers} layers over {stages} virtual stages); pass --custom_pipeline_layers or fewer stages"
        )
    return PipelineLayout(pp, vpp, tuple(counts))
