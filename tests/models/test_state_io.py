"""Training state without pickle: a resume file round-trips, and no file runs code."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffwidget.models.state_io import STATE_KEY, StateFileError, load_state, save_state
from diffwidget.models.train import DATA_FILE, RESUME_FILE, _read_state


def trained_state() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Generator]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    generator = torch.Generator().manual_seed(3)
    for _ in range(2):
        x = torch.randn(8, 3, generator=generator)
        optimiser.zero_grad()
        model(x).pow(2).mean().backward()
        optimiser.step()
    return model, optimiser, generator


def next_step(
    model: torch.nn.Module, optimiser: torch.optim.Optimizer, generator: torch.Generator
) -> torch.Tensor:
    x = torch.randn(8, 3, generator=generator)
    optimiser.zero_grad()
    model(x).pow(2).mean().backward()
    optimiser.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_resume_state_round_trips_and_training_continues_identically(tmp_path: Path) -> None:
    model, optimiser, generator = trained_state()
    state = {
        "step": 2,
        "trained": [model.state_dict()],
        "optimiser": optimiser.state_dict(),
        "generator": generator.get_state(),
        "running": 0.25,
        "resumed_at": [],
        "captions": ["a red circle", ""],
    }
    loaded = load_state(save_state(state, tmp_path / RESUME_FILE))
    assert (loaded["step"], loaded["running"], loaded["captions"]) == (2, 0.25, state["captions"])
    assert set(loaded["optimiser"]["state"]) == set(state["optimiser"]["state"])  # int keys
    # A fresh model, optimiser and generator restored from the file continue exactly as the
    # original ones do.
    again, _, _ = trained_state()
    again.load_state_dict(loaded["trained"][0])
    resumed = torch.optim.AdamW(again.parameters(), lr=1e-2)
    resumed.load_state_dict(loaded["optimiser"])
    restored = torch.Generator().manual_seed(99)
    restored.set_state(loaded["generator"])
    torch.testing.assert_close(
        next_step(again, resumed, restored), next_step(model, optimiser, generator), rtol=0, atol=0
    )


def test_a_pickled_file_from_an_older_run_runs_no_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (Path.touch, (str(marker),))

    legacy = (tmp_path / RESUME_FILE).with_suffix(".pt")
    legacy.write_bytes(pickle.dumps({"step": Payload()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        _read_state(tmp_path / RESUME_FILE)
    assert not marker.exists()
    pickle.loads(legacy.read_bytes())  # what an unrestricted load would have done
    assert marker.exists()
    # A plain old file (tensors and numbers) still opens.
    torch.save(
        {"mean": torch.ones(2), "captions": ["x"]}, (tmp_path / DATA_FILE).with_suffix(".pt")
    )
    assert _read_state(tmp_path / DATA_FILE)["captions"] == ["x"]
    assert _read_state(tmp_path / "absent.safetensors") is None


@pytest.mark.parametrize(
    ("skeleton", "fragment"),
    [
        ('{"w": {"$tensor": "9"}}', "names a missing tensor"),
        ("[" * 50_000 + "]" * 50_000, "nested 50000 deep"),
        ('{"state": {"$items": [[1]]}}', "should be [key, value] pairs"),
    ],
)
def test_a_damaged_state_file_is_refused_by_name(
    tmp_path: Path, skeleton: str, fragment: str
) -> None:
    path = tmp_path / "bad.safetensors"
    save_file({"0": torch.zeros(1)}, str(path), metadata={STATE_KEY: skeleton})
    with pytest.raises(StateFileError) as info:
        load_state(path)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)
