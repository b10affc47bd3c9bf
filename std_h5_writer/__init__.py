"""std_h5_writer: write images from the ImageBuffer into HDF5 files, as writer_agent asks."""
