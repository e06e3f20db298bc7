"""The stable public path of :mod:`aligner.models.hub` for plugins (``from aligner import hub``): models by Hub ID."""

from aligner.models.hub import cached_file, fetch_command, hub_cache, is_hub_id, offline, snapshot  # noqa: F401
