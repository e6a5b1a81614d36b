"""The names of a run's metrics and the registered method behind each method-backed one.

A leaf module: the metrics' own modules (:mod:`.commitment`, :mod:`.concept_metric`) and
:mod:`.metrics`, which dispatches to them, all read these names from here.
"""

from __future__ import annotations

from typing import Literal, get_args

Metric = Literal["faithfulness", "segmentation", "roles", "probes", "commitment", "concepts"]
METRICS: tuple[str, ...] = get_args(Metric)
#: Metrics computed by a registered method, whose config the run settings keep (and
#: ``--set METHOD.SETTING=VALUE`` reaches): the prompt switch, the concept maps.
METRIC_METHODS: dict[str, str] = {"commitment": "prompt_switch", "concepts": "concept_maps"}
