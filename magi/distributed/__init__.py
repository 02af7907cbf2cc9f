"""Multi-GPU inference: process mesh, Ulysses context parallelism, pipeline parallelism.

Entry points: ``init_from_env(engine_config)`` joins the torchrun process group and returns the
``Mesh``; ``parallelize(model, mesh, engine_config)`` applies CP/PP to a built DiT;
``build_parallel_dit(cfg, mesh)`` loads only this stage's layers and parallelizes them;
``decode_to_uint8`` is the tile-parallel drop-in for ``magi.video_io.decode_to_uint8``;
``share_from_rank0`` runs work (T5) on one rank and shares the result; ``fail_fast()`` makes one
rank's exception stop every rank; ``is_writer_rank()`` says which process writes files. The model
files never import torch.distributed.
"""

from magi.distributed.mesh import (
    Mesh,
    any_rank,
    check_same_config,
    current_mesh,
    fail_fast,
    init_from_env,
    is_writer_rank,
    share_from_rank0,
    shutdown,
)
from magi.distributed.parallelize import build_parallel_dit, parallelize
from magi.distributed.vae_parallel import decode_to_uint8, tile_parallel_decode

__all__ = [
    "Mesh",
    "any_rank",
    "build_parallel_dit",
    "check_same_config",
    "current_mesh",
    "decode_to_uint8",
    "fail_fast",
    "init_from_env",
    "is_writer_rank",
    "parallelize",
    "share_from_rank0",
    "shutdown",
    "tile_parallel_decode",
]
