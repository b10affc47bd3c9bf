"""Fixtures of the std_h5_writer tests."""
from __future__ import annotations

import threading
import time

import pytest

from core_buffer.service import run
from std_h5_writer.writer import H5Writer
from tests.std_h5_writer.agent import Agent


@pytest.fixture
def writer_rig(make_config, tmp_path):
    started = []

    def factory(**overrides):
        overrides.setdefault("output_dirs", [str(tmp_path)])
        _, config = make_config(**overrides)
        agent = Agent(config)
        writer = H5Writer(config)
        stop = threading.Event()
        thread = threading.Thread(target=run, args=(writer, stop), daemon=True)
        thread.start()
        started.append((agent, stop, thread))
        time.sleep(0.2)
        return agent, writer

    yield factory
    for agent, stop, thread in started:
        stop.set()
        thread.join(timeout=10)
        agent.close()
