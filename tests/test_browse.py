"""``btckpt browse``: the Textual UI driven headless by its pilot.

Internals used: btckpt.cli.browse (the Textual app and its screens, driven by the pilot: the command's UI has no
import surface).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import btckpt
import pytest
import torch

pytest.importorskip("textual", reason="the browser needs the btckpt[tui] extra, not in the lowest-versions venv")
from btckpt.cli.browse import BrowseApp, CheckpointScreen, fuzzy_score  # noqa: E402
from test_upload import s3  # noqa: E402,F401,F811 - fixtures


def _tree(root: Path) -> None:
    model = {"embed.weight": torch.arange(12, dtype=torch.float32).reshape(4, 3),
             "head.bias": torch.tensor([1.0, float("nan"), -2.0])}
    btckpt.save(root / "checkpoint-3", {"model": model, "extra": {"epoch": 1}}, save_rng=False,
                extra_files={"config.json": b'{"hidden": 3, "layers": [1, 2]}'})
    btckpt.save(root / "checkpoint-7", {"model": model}, save_rng=False)


def test_fuzzy_score():
    assert fuzzy_score("ck7", "checkpoint-7") is not None
    assert fuzzy_score("x", "checkpoint-7") is None
    assert fuzzy_score("chk", "checkpoint") > fuzzy_score("cpt", "checkpoint")  # type: ignore[operator]


def test_pick_open_safetensors_and_json(tmp_path: Path):
    _tree(tmp_path / "ck")

    async def drive() -> None:
        app = BrowseApp(str(tmp_path / "ck"))
        async with app.run_test(size=(140, 40)) as pilot:
            await pilot.press(*"pt-3")  # fuzzy filter: only checkpoint-3 is left
            await pilot.pause()
            options = app.query_one("#checkpoints")
            assert options.option_count == 1
            await pilot.press("enter")
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, CheckpointScreen) and screen.info.step == 3
            tree = screen.query_one("#files")
            leaves = {n.data: n for n in tree.root.children}
            assert set(leaves) == {"btckpt.json", "config.json", "model.safetensors", "model.safetensors.index.json"}
            tree.select_node(leaves["model.safetensors"])
            await pilot.pause()
            table = screen.query_one("#tensors")
            rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
            assert rows == [["embed.weight", "F32", "[4, 3]", "12", "48 B"], ["head.bias", "F32", "[3]", "3", "12 B"]]
            await pilot.press("s")  # statistics: reads the data (torch, lazily)
            for _ in range(100):
                await pilot.pause(0.05)
                if len(table.columns) == 9:
                    break
            assert table.get_row_at(0)[5:] == ["0", "11", "5.5", "0"]
            assert table.get_row_at(1)[5:] == ["-2", "1", "-0.5", "1"]
            tree.select_node(leaves["config.json"])
            await pilot.pause()
            assert screen.query_one("#view").current == "text"
            assert screen.query_one("#text").text == '{\n  "hidden": 3,\n  "layers": [\n    1,\n    2\n  ]\n}'
            await pilot.press("escape")
            await pilot.pause()
            assert not isinstance(app.screen, CheckpointScreen)

    asyncio.run(drive())


def test_browse_s3_checkpoint(s3: str, tmp_path: Path):  # noqa: F811
    import fsspec

    _tree(tmp_path / "ck")
    fsspec.filesystem("s3").put(str(tmp_path / "ck") + "/", f"{s3[5:]}/run/", recursive=True)

    async def drive() -> None:
        app = BrowseApp(f"{s3}/run")
        async with app.run_test(size=(140, 40)) as pilot:
            await pilot.pause()
            assert app.query_one("#checkpoints").option_count == 2
            await pilot.press("enter")  # newest first: checkpoint-7
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, CheckpointScreen) and screen.info.step == 7
            screen.open_file("model.safetensors")
            await pilot.pause()
            table = screen.query_one("#tensors")
            assert [str(table.get_row_at(i)[0]) for i in range(table.row_count)] == ["embed.weight", "head.bias"]

    asyncio.run(drive())
