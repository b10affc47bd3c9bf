"""std_stream_recv: receive images from std_stream_send into this server's ImageBuffer and publish them."""
