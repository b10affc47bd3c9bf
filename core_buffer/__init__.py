"""core_buffer: the one library std-daq services share (formats, ring buffers, detectors, config,
addresses, the run loop). It imports no service package."""
from core_buffer.config import DetectorConfig, ModulePosition, Section, load_config, parse_config
from core_buffer.errors import (
    BufferLayoutError,
    BufferMissingError,
    ConfigError,
    FormatError,
    ImageLostError,
    RingBufferError,
    StdDaqError,
)
from core_buffer.formats import (
    INVALID_ID,
    Dtype,
    Encoding,
    ImageMetadata,
    ImageStatus,
    ModuleFrame,
    StoreOp,
    StoreStream,
    WriterState,
    WriterStatus,
)
from core_buffer.ringbuffer import BufferLayout, FrameBuffer, ImageBuffer, RingBuffer

__version__ = "0.1.0"

__all__ = [
    "BufferLayout", "BufferLayoutError", "BufferMissingError", "ConfigError", "DetectorConfig", "Dtype",
    "Encoding", "FormatError", "FrameBuffer", "INVALID_ID", "ImageBuffer", "ImageLostError",
    "ImageMetadata", "ImageStatus", "ModuleFrame", "ModulePosition", "RingBuffer", "RingBufferError",
    "Section", "StdDaqError", "StoreOp", "StoreStream", "WriterState", "WriterStatus", "load_config",
    "parse_config",
]
