"""A recording stand-in for magi.pipeline.MagiPipeline, for CLI tests that load no model."""

from __future__ import annotations

import types


class Recorder:
    """Stands in for magi.pipeline.MagiPipeline and records what the CLI asks of it."""

    calls: list[tuple[str, dict]] = []

    @classmethod
    def from_config(cls, cfg, **kwargs):
        cls.calls.append(("from_config", {"cfg": cfg, **kwargs}))
        return cls()

    def generate(self, **kwargs):
        self.calls.append(("generate", kwargs))
        return types.SimpleNamespace(interrupted=False, exit_status=0, summary=lambda: "done")
