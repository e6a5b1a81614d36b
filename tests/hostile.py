"""Hostile data as people pass it around: a run folder and a trace whose strings are markup.

Every string that comes from a file (prompt, stored error, folder name, metric and curve
names, token strings, layer names, settings; item ids are file-safe by rule) carries payloads
that run script if a view ever parses them as HTML: ``<img onerror>``, ``<script>``, ``<svg
onload>``, an ``<iframe srcdoc>``, a ``javascript:`` link, quote-breaking attribute escapes,
element-closing escapes (``</title>``, ``</textarea>``) and a MathJax ``\\href``.
Each payload calls ``alert`` and requests a URL holding :data:`MARK`, so a browser test sees
any of them fire (a dialog, a request, an instrumented call). Built with NumPy only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from diffwidget.runs.item_records import CurveEntry, ItemError, ItemRecord
from diffwidget.runs.manifest import RunManifest, Work, item_key
from diffwidget.runs.prompts import PromptItem
from diffwidget.runs.settings import RunSettings
from diffwidget.runs.store import RunStore, write_json
from diffwidget.testing.synthetic import LAYER_GRIDS, synthetic_trace
from diffwidget.tracing.trace import Trace

#: In every payload's URLs and alerts: a request or a dialog holding it means script ran.
MARK = "dwxss"
#: Steps of the hostile trace.
N_STEPS = 6


def payload(tag: str) -> str:
    """Text with every kind of markup payload; ``tag`` names where it was placed."""
    code = (
        f"alert('{MARK}-{tag}');fetch('/api/contents/{MARK}-{tag}.txt',"
        "{method:'PUT',body:JSON.stringify({type:'file',format:'text',content:'x'})})"
    )
    return (
        f'a red circle <img src="{MARK}-{tag}.png" onerror="{code}">'
        f" <script>{code}</script>"
        f' "><svg onload="{code}"></svg>'
        f" '><img src={MARK}-{tag}-q.png onerror={code}>"
        f" </title></textarea></style><img src={MARK}-{tag}-t.png onerror={code}>"
        f' <iframe srcdoc="<script>{code}</script>"></iframe>'
        f' <a href="javascript:{code}">javascript:alert(1)</a>'
        f" $\\href{{javascript:alert('{MARK}-{tag}')}}{{click}}$"
    )


def token_payload(tag: str) -> str:
    """A payload as long as a token or a layer name may be (a trace refuses longer ones)."""
    code = f"alert('{MARK}-{tag}');fetch('/api/contents/{MARK}-{tag}.txt',{{method:'PUT'}})"
    return (
        f'<img src="{MARK}-{tag}.png" onerror="{code}"><script>{code}</script>'
        f'"><svg onload="{code}"></svg>'
    )


def file_safe_payload(tag: str) -> str:
    """A payload that can be a file or folder name (no ``/``, under 120 bytes)."""
    return (
        f"{tag}\"'><img src={MARK}-{tag}.png onerror=alert('{MARK}-{tag}')>"
        f"<svg onload=alert('{MARK}-{tag}')>javascript:alert(1)"
    )


#: The folder name of :func:`write_hostile_run`'s run.
RUN_FOLDER = "run-" + file_safe_payload("folder")
#: Ids of its items: traced, failed, not computed yet. Ids are file-safe by rule (a manifest
#: with any other id is refused when read: :data:`HOSTILE_ID`), so these are plain; the
#: browser tests pick each item by its prefix ("id", "failed", "missing").
OK_ID, FAILED_ID, MISSING_ID = "id-traced", "failed-item", "missing-item"
#: An id no run may hold: reading a manifest that names it is refused.
HOSTILE_ID = file_safe_payload("id")


def key_of(item_id: str, seed: int) -> str:
    """The key of an item of :func:`write_hostile_run` (its base seed given)."""
    # A given seed decides the generator seed; the prompt plays no part in it.
    return item_key(item_id, PromptItem(item_id, "any prompt", seed=seed).generator_seed(0))


OK_KEY, FAILED_KEY, MISSING_KEY = key_of(OK_ID, 1), key_of(FAILED_ID, 2), key_of(MISSING_ID, 3)
#: The prompt of the traced item (and of its trace).
PROMPT = payload("prompt")
#: The failed item's stored error message.
ERROR = payload("error")
#: A metric and a curve name stored in the records.
METRIC = payload("metric") + ".deletion_gain"
CURVE = payload("curve")
#: The hostile layer's name (a module path in a real trace).
LAYER = "down_blocks.0." + token_payload("layer")


def hostile_trace() -> Trace:
    """The synthetic trace with a hostile prompt, two hostile tokens and a hostile layer."""
    trace = synthetic_trace(n_steps=N_STEPS, prompt=PROMPT)
    tokens = list(trace.tokens)
    tokens[2], tokens[3] = token_payload("token"), file_safe_payload("token2")
    first = next(iter(LAYER_GRIDS))
    attention = {(LAYER if name == first else name): maps for name, maps in trace.attention.items()}
    return dataclasses.replace(trace, tokens=tokens, attention=attention)


def _curve() -> CurveEntry:
    fractions = np.linspace(0.0, 1.0, 5)
    return CurveEntry(
        step=2,
        fractions=fractions.tolist(),
        deletion=(1 - fractions).tolist(),
        insertion=fractions.tolist(),
        random_deletion=(1 - 0.5 * fractions).tolist(),
        random_insertion=(0.5 * fractions).tolist(),
    )


def _record(work: Work, **fields: object) -> ItemRecord:
    return work.record(**fields)


def write_hostile_run(parent: Path) -> Path:
    """A run folder (as ``diffwidget run`` writes one) whose every string is hostile.

    Items: one finished with a trace, one failed with a hostile error, one not computed yet.
    """
    store = RunStore(parent / RUN_FOLDER)
    items = [
        # Labels hold at most 200 characters: the shorter payload.
        PromptItem(OK_ID, PROMPT, labels={"colour": file_safe_payload("label")}, seed=1),
        PromptItem(FAILED_ID, payload("failed-prompt"), seed=2),
        PromptItem(MISSING_ID, payload("missing-prompt"), seed=3),
    ]
    settings = RunSettings(seeds=(0,), metrics=(), model=payload("setting"))
    manifest = RunManifest.create(settings, items)
    store.root.mkdir(parents=True)
    write_json(store.manifest_path, manifest.to_json())
    ok, failed, _ = manifest.work()
    trace_path = store.trace_path(ok.key)
    trace_path.parent.mkdir(parents=True)
    hostile_trace().save(trace_path)
    arrays_path = store.arrays_path(ok.key)
    arrays_path.parent.mkdir(parents=True)
    np.savez(arrays_path)
    files = {"trace": store.file_entry(trace_path), "arrays": store.file_entry(arrays_path)}
    record = _record(
        ok,
        status="ok",
        metrics={"seg.ours.iou@0.4": 0.25, METRIC: 0.1},
        curves={CURVE: _curve()},
        files=files,
    )
    write_json(store.item_path(ok.key), record.to_json())
    error = ItemError(type="RuntimeError", message=ERROR, traceback=ERROR)
    write_json(store.item_path(failed.key), _record(failed, status="failed", error=error).to_json())
    return store.root
