"""std_assembler: synchronise module frames, convert and assemble images into the ImageBuffer."""
