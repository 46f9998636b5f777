"""A store on a full disk (a small tmpfs): `asymre run` stops with one line naming the stage and the space a
round needs, the tables keep their previous versions, and the rerun after freeing space gives the result of
a run that never ran out."""

import subprocess

import pytest
from typer.testing import CliRunner

from flows.cli import app
from storage import tables
from tests.frames import COMPARED, TINY, comparable

pytestmark = pytest.mark.slow

SETS = [x for a in [*TINY, "name=tiny"] for x in ("--set", a)]


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_stops_cleanly_and_the_rerun_after_freeing_space_is_identical(small_disk, tmp_path, prefect_harness):
    from flows import progress
    from flows.config import load_config
    from flows.iterate import experiment_flow

    reference = tmp_path / "reference"
    experiment_flow(load_config(None, [*TINY, "name=tiny", f"store={reference}"]))

    store = small_disk / "store"
    reporter = progress.REPORTER
    try:
        full = CliRunner().invoke(app, ["run", "--store", str(store), *SETS])
        assert full.exit_code == 1, full.output
        assert "Traceback" not in full.output, full.output
        message = full.output[full.output.index("error: ") :]
        assert message.startswith("error: disk full: "), message
        assert f"could not write to the store {store}" in message and "free space and rerun" in message, message
        versions = {t: tables.version(str(store), t) for t in COMPARED}

        subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)  # space freed
        assert {t: tables.version(str(store), t) for t in COMPARED} == versions  # nothing moved meanwhile
        again = CliRunner().invoke(app, ["run", "--store", str(store), *SETS])
        assert again.exit_code == 0, again.output
    finally:
        progress.REPORTER = reporter
    for table in COMPARED:
        assert comparable(store, table).equals(comparable(reference, table)), table
