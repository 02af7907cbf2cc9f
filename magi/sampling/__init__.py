"""The MAGI-1 autoregressive sampler: time schedule, chunk plan, guidance and the denoise loop."""

from magi.sampling.chunks import ChunkPlan, Step
from magi.sampling.guidance import cfg_scales, combine_cfg, distill_blend
from magi.sampling.schedule import distill_step_size, step_intervals, time_schedule

__all__ = [
    "ChunkPlan",
    "Step",
    "cfg_scales",
    "combine_cfg",
    "distill_blend",
    "distill_step_size",
    "step_intervals",
    "time_schedule",
]
