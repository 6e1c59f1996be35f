"""Data: the ADM crop, image sources, the encoded HDF5 format (writer, pipeline, training reader)."""
