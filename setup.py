"""std-daq: detector data acquisition from UDP to shared memory to HDF5."""
from setuptools import find_packages, setup

PACKAGES = [
    "core_buffer",
    "std_udp_recv",
    "std_assembler",
    "std_stream_send",
    "std_stream_recv",
    "writer_agent",
    "std_h5_writer",
    "std_daq",
    "std_web",
]

# One console script per service; each points at the package's cli:main.
SERVICE_SCRIPTS = [
    "std_udp_recv = std_udp_recv.cli:main",
    "std_udp_sim = std_udp_recv.sim_cli:main",
    "std_assembler = std_assembler.cli:main",
    "std_stream_send = std_stream_send.cli:main",
    "std_stream_recv = std_stream_recv.cli:main",
    "writer_agent = writer_agent.cli:main",
    "std_h5_writer = std_h5_writer.cli:main",
    "std_web = std_web.cli:main",
    "std-daq = std_daq.cli:main",
]

setup(
    name="std-daq",
    version="0.1.0",
    description="Data acquisition for X-ray detectors: UDP to shared-memory buffers to HDF5",
    python_requires=">=3.10",
    packages=find_packages(include=[p for p in PACKAGES] + [p + ".*" for p in PACKAGES]),
    package_data={"core_buffer": ["configs/*.json"], "std_web": ["static/*.html", "static/*.js", "static/*.css"]},
    install_requires=[
        "numpy>=1.24,<3",
        "pyzmq>=26.4,<28",  # Socket.recv_into
        "pika>=1.3,<2",
        "h5py>=3.8,<4",
        "hdf5plugin>=4.1,<8",
        "posix_ipc>=1.1,<2",
        "numba>=0.58,<1",
        "psutil>=5.9,<8",
        "prometheus-client>=0.20,<1",  # start_http_server returns (server, thread)
        "fastapi>=0.110,<1",  # std_web
        "uvicorn>=0.35,<1",  # std_web: Server.serve(sockets=...), the websockets-sansio protocol
        "websockets>=13,<18",  # std_web: uvicorn's WebSocket protocol (sans-I/O)
    ],
    extras_require={
        "test": [
            "pytest>=7.4,<10",
            "pytest-timeout>=2.1,<3",
            "hypothesis>=6.80,<7",
            "docker>=6,<8",
            "pyyaml>=6,<7",
            "playwright>=1.40,<2",  # tests/std_web: drives Debian's /usr/bin/chromium, never its own browser
        ],
    },
    entry_points={"console_scripts": SERVICE_SCRIPTS},
)
