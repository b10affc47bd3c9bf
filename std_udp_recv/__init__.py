"""std_udp_recv: receive one detector module's UDP stream into the FrameBuffer; std_udp_sim, the simulator."""
