"""Image I/O: PNG output with its metadata (output, pngmeta), the HDR companion (hdr, tonemap) and cube maps."""
