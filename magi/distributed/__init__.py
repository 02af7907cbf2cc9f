"""Multi-GPU inference: process mesh, Ulysses context parallelism, pipeline parallelism.

Entry points: ``init_from_env(engine_config)`` joins the torchrun process group and returns the
``Mesh``; ``parallelize(model, mesh, engine_config)`` applies CP/PP to a built DiT;
``fail_fast()`` makes one rank's exception stop every rank; ``is_writer_rank()`` says which process
writes files. The model files never import torch.distributed.
"""

from magi.distributed.mesh import (
    Mesh,
    check_same_config,
    current_mesh,
    fail_fast,
    init_from_env,
    is_writer_rank,
    shutdown,
)

__all__ = [
    "Mesh",
    "check_same_config",
    "current_mesh",
    "fail_fast",
    "init_from_env",
    "is_writer_rank",
    "shutdown",
]
