"""std_stream_send: replicate the ImageBuffer to another server over ZMQ TCP; live preview stream."""
